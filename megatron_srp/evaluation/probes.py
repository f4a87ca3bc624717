"""Linear probes on a model's activations (Sam et al. 2026): how cleanly safe and unsafe text
separate inside the model, layer by layer.

The activation of a text is the hidden state at its last token at the output of a transformer
layer: the first, the middle (``num_layers // 2``, 0-based) and the last. A logistic regression
(features standardised on the training subset) is trained on a balanced subset of 500 safe and
500 unsafe examples and scored by AUC on a balanced test set drawn from the rest; mean and
population standard deviation (ddof 0) over 5 seeds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch


def probe_layers(num_layers: int) -> dict[str, int]:
    """``{"first": 0, "middle": num_layers // 2, "last": num_layers - 1}``."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return {"first": 0, "middle": num_layers // 2, "last": num_layers - 1}


@torch.no_grad()
def last_token_activations(model, token_lists: Sequence[Sequence[int]], layers: Sequence[int],
                           batch_size: int = 16, progress: bool = False,
                           pad_id: int = 0) -> dict[int, np.ndarray]:
    """``{layer: float32 [n, hidden]}``: each sequence's last-token hidden state at the output
    of ``model.decoder.layers[layer]`` (a Megatron GPTModel, TP=1, PP=1). Sequences are
    right-padded in batches (causal attention: a position never sees the padding after it) and
    keep their last ``max_sequence_length`` tokens."""
    from tqdm import tqdm

    from megatron_srp import compat

    for i, seq in enumerate(token_lists):
        if len(seq) == 0:
            raise ValueError(f"sequence {i} is empty")
    window = int(model.max_sequence_length)
    device = next(model.parameters()).device
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def store(_module, _inputs, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
        return store

    handles = [model.decoder.layers[i].register_forward_hook(hook(i)) for i in layers]
    out: dict[int, list[np.ndarray]] = {i: [] for i in layers}
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(token_lists), batch_size), disable=not progress,
                          desc="activations", leave=False):
            batch = [list(s)[-window:] for s in token_lists[start:start + batch_size]]
            lengths = torch.tensor([len(s) for s in batch], device=device)
            tokens = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
            for j, s in enumerate(batch):
                tokens[j, :len(s)] = torch.tensor(s)
            tokens = tokens.to(device)
            positions = torch.arange(tokens.size(1), device=device).expand_as(tokens)
            with compat.device_clean():
                model(tokens, positions, None)
            rows = torch.arange(len(batch), device=device)
            for i in layers:
                hidden = captured[i]  # [s, b, h]
                out[i].append(hidden[lengths - 1, rows].float().cpu().numpy())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: np.concatenate(v) for i, v in out.items()}


@dataclass
class ProbeResult:
    auc_mean: float
    auc_std: float
    aucs: list[float]
    accuracy_mean: float
    n_train_per_class: int
    n_test_per_class: int
    seeds: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def balanced_split(labels: np.ndarray, n_train_per_class: int, seed: int,
                   max_test_per_class: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` index arrays: ``n_train_per_class`` of each class for training, and a
    balanced test set from the rest (as many of each class as the smaller class has left)."""
    rng = np.random.default_rng(seed)
    pos, neg = (rng.permutation(np.flatnonzero(labels == c)) for c in (1, 0))
    train = np.concatenate([pos[:n_train_per_class], neg[:n_train_per_class]])
    n_test = min(len(pos), len(neg)) - n_train_per_class
    if max_test_per_class is not None:
        n_test = min(n_test, max_test_per_class)
    test = np.concatenate([pos[n_train_per_class:n_train_per_class + n_test],
                           neg[n_train_per_class:n_train_per_class + n_test]])
    return train, test


def fit_probe(features: np.ndarray, labels: np.ndarray, n_train_per_class: int = 500,
              seeds: Sequence[int] = (0, 1, 2, 3, 4), max_test_per_class: Optional[int] = None,
              C: float = 1.0) -> ProbeResult:
    """Logistic-regression probe: AUC and accuracy on held-out balanced data, per seed.

    With too few examples for ``n_train_per_class`` (a class needs that many plus some to
    test on), the training subset shrinks to leave a fifth of the smaller class for testing;
    the result records the numbers used.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features {features.shape} and labels {labels.shape} do not match")
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise ValueError(f"labels must be 0 (safe) or 1 (unsafe), got {np.unique(labels)}")
    smaller = int(min((labels == 1).sum(), (labels == 0).sum()))
    if smaller < 4:
        raise ValueError(f"a probe needs at least 4 examples of each class, got "
                         f"{int((labels == 1).sum())} unsafe and {int((labels == 0).sum())} safe")
    n_train = min(n_train_per_class, smaller - max(1, smaller // 5))
    aucs, accs, n_test = [], [], 0
    for seed in seeds:
        train, test = balanced_split(labels, n_train, seed, max_test_per_class)
        scaler = StandardScaler().fit(features[train])
        clf = LogisticRegression(C=C, max_iter=1000)
        clf.fit(scaler.transform(features[train]), labels[train])
        x_test = scaler.transform(features[test])
        aucs.append(float(roc_auc_score(labels[test], clf.predict_proba(x_test)[:, 1])))
        accs.append(float((clf.predict(x_test) == labels[test]).mean()))
        n_test = len(test) // 2
    return ProbeResult(auc_mean=float(np.mean(aucs)), auc_std=float(np.std(aucs)),
                       aucs=aucs, accuracy_mean=float(np.mean(accs)), n_train_per_class=n_train,
                       n_test_per_class=n_test, seeds=list(seeds))


def probe_layers_report(acts: dict[int, np.ndarray], labels: np.ndarray,
                        names: dict[str, int], **fit_kwargs) -> dict[str, dict[str, Any]]:
    """``{name: probe result + {"layer": index}}`` for each named layer."""
    return {name: {**fit_probe(acts[i], labels, **fit_kwargs).to_dict(), "layer": i}
            for name, i in names.items()}
