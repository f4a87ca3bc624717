"""Greedy Coordinate Gradient (Zou et al. 2023): an adversarial suffix that makes the model
begin its answer with a target string, found against the project's own Megatron models.

Each step takes the gradient of the target loss with respect to a one-hot encoding of the
suffix tokens, keeps the ``top_k`` most promising replacement tokens per position, samples
``search_width`` candidate suffixes that each change one position, scores them all with a
batched forward pass and keeps the best. The defaults are the paper's: 500 steps, a suffix
initialised to "x x ... x" (20 tokens), top-k 256, target "Sure". A suffix is optimised for one
prompt (individual) or for several at once (universal: the losses are summed).

The model must hold the whole network (TP=1, PP=1: ``load_for_inference``). Special tokens
(end of document, reflection markers, the harmfulness tag) and non-ASCII tokens are never
proposed, and a candidate whose text does not re-tokenise to the same ids is discarded, so
the suffix found is a string anyone can paste.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_srp.evaluation.attacks import TEMPLATES, attack_ids


@dataclass
class GCGConfig:
    steps: int = 500
    suffix_init: str = " ".join(["x"] * 20)
    target: str = "Sure"
    top_k: int = 256
    search_width: int = 512
    eval_batch_size: int = 128
    template: str = "chat"
    stop_on_success: bool = True  # stop once greedy decoding would produce the target
    seed: int = 0

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got "
                             f"{self.template!r}")
        for name in ("steps", "top_k", "search_width", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.target or not self.suffix_init.strip():
            raise ValueError("target and suffix_init must be non-empty")


@dataclass
class GCGResult:
    suffix: str
    suffix_ids: list[int]
    loss: float                      # the best suffix's target loss (summed over prompts)
    initial_loss: float
    losses: list[float] = field(default_factory=list)  # best loss after each step
    steps: int = 0
    success: bool = False            # greedy decoding begins with the target for every prompt
    seconds: float = 0.0


def allowed_tokens(tokenizer) -> torch.Tensor:
    """Bool mask over the vocabulary: printable ASCII, non-special tokens."""
    allowed = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    special = set(tokenizer.special_token_ids.values())
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        text = tokenizer.detokenize([i])
        allowed[i] = bool(text) and text.isascii() and text.isprintable()
    return allowed


class _Pieces:
    """Token ids of one prompt around the suffix (as ``attack_ids`` lays them out), and the
    target after them."""

    def __init__(self, tokenizer, prompt: str, cfg: GCGConfig, device: torch.device):
        marker = [tokenizer.eod]  # a stand-in suffix, to find where the suffix goes
        ids = attack_ids(tokenizer, prompt, cfg.template, marker)
        at = len(ids) - 1 - ids[::-1].index(tokenizer.eod)
        self.before = torch.tensor(ids[:at], device=device)
        self.after = torch.tensor(ids[at + 1:], device=device, dtype=torch.long)
        self.target = torch.tensor(tokenizer.tokenize(cfg.target), device=device)

    def sequences(self, suffixes: torch.Tensor) -> torch.Tensor:
        """[n, S] full token ids for n candidate suffixes [n, L]."""
        n = suffixes.shape[0]
        parts = [self.before, None, self.after, self.target]
        return torch.cat([suffixes if p is None else p.unsqueeze(0).expand(n, -1)
                          for p in parts], dim=1)

    def target_slice(self, suffix_len: int) -> slice:
        start = len(self.before) + suffix_len + len(self.after)
        return slice(start, start + len(self.target))


def _target_losses(model, pieces: _Pieces, suffixes: torch.Tensor, vocab: int,
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per candidate, whether its greedy answer begins with the target), batched."""
    losses, hits = [], []
    tgt = pieces.target_slice(suffixes.shape[1])
    for start in range(0, suffixes.shape[0], batch_size):
        ids = pieces.sequences(suffixes[start:start + batch_size])
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        with torch.no_grad():
            logits = model(ids, pos, None)[..., :vocab].float()
        pred = logits[:, tgt.start - 1:tgt.stop - 1]
        target = ids[:, tgt]
        losses.append(F.cross_entropy(pred.transpose(1, 2), target, reduction="none").mean(1))
        hits.append((pred.argmax(-1) == target).all(1))
    return torch.cat(losses), torch.cat(hits)


def _token_gradients(model, pieces: _Pieces, suffix: torch.Tensor, vocab: int) -> torch.Tensor:
    """d(target loss) / d(one-hot suffix), [L, vocab]."""
    weight = model.embedding.word_embeddings.weight
    one_hot = F.one_hot(suffix, weight.shape[0]).to(weight.dtype)
    one_hot.requires_grad_(True)
    ids = pieces.sequences(suffix.unsqueeze(0))
    embeds = weight[ids[0]].detach().clone()
    n_before = len(pieces.before)
    embeds = torch.cat([embeds[:n_before], one_hot @ weight, embeds[n_before + len(suffix):]])
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    logits = model(ids, pos, None, decoder_input=embeds.unsqueeze(1))[..., :vocab].float()
    tgt = pieces.target_slice(len(suffix))
    loss = F.cross_entropy(logits[0, tgt.start - 1:tgt.stop - 1], ids[0, tgt])
    (grad,) = torch.autograd.grad(loss, one_hot)
    return grad[:, :vocab]


def _sample_candidates(suffix: torch.Tensor, grad: torch.Tensor, allowed: torch.Tensor,
                       cfg: GCGConfig, gen: torch.Generator) -> torch.Tensor:
    """``search_width`` suffixes, each with one position swapped for a top-k token."""
    grad = grad.masked_fill(~allowed.to(grad.device), float("inf"))
    top = (-grad).topk(min(cfg.top_k, int(allowed.sum())), dim=1).indices  # [L, k]
    n, length = cfg.search_width, len(suffix)
    positions = torch.randint(0, length, (n,), generator=gen).to(suffix.device)
    choice = torch.randint(0, top.shape[1], (n,), generator=gen).to(suffix.device)
    candidates = suffix.unsqueeze(0).repeat(n, 1)
    candidates[torch.arange(n, device=suffix.device), positions] = top[positions, choice]
    return candidates


def _round_trips(tokenizer, candidates: torch.Tensor) -> torch.Tensor:
    keep = [tokenizer.tokenize(tokenizer.detokenize(c.tolist())) == c.tolist()
            for c in candidates]
    return torch.tensor(keep, dtype=torch.bool, device=candidates.device)


def optimize_suffix(model, tokenizer, prompts: Sequence[str], cfg: Optional[GCGConfig] = None,
                    progress: bool = False) -> GCGResult:
    """One suffix for ``prompts`` (one prompt: the individual attack; several: universal)."""
    from tqdm import tqdm

    cfg = cfg or GCGConfig()
    if not prompts:
        raise ValueError("GCG needs at least one prompt")
    device = next(model.parameters()).device
    vocab = tokenizer.vocab_size
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    allowed = allowed_tokens(tokenizer)
    pieces = [_Pieces(tokenizer, p, cfg, device) for p in prompts]
    suffix = torch.tensor(tokenizer.tokenize(cfg.suffix_init), device=device)
    gen = torch.Generator().manual_seed(cfg.seed)

    def score(cands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(len(cands), device=device)
        hit = torch.ones(len(cands), dtype=torch.bool, device=device)
        for pc in pieces:
            loss, ok = _target_losses(model, pc, cands, vocab, cfg.eval_batch_size)
            total, hit = total + loss, hit & ok
        return total, hit

    loss0, hit0 = score(suffix.unsqueeze(0))
    best_loss, success = float(loss0[0]), bool(hit0[0])
    result = GCGResult(tokenizer.detokenize(suffix.tolist()), suffix.tolist(), best_loss,
                       best_loss, success=success)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="GCG", unit="step")
    for step in bar:
        if success and cfg.stop_on_success:
            break
        grad = sum(_token_gradients(model, pc, suffix, vocab) for pc in pieces)
        candidates = _sample_candidates(suffix, grad, allowed, cfg, gen)
        candidates = candidates[_round_trips(tokenizer, candidates)]
        if len(candidates):
            losses, hits = score(candidates)
            i = int(losses.argmin())
            # The paper's update: the step's best candidate replaces the suffix.
            suffix, current, success = candidates[i], float(losses[i]), bool(hits[i])
            if current < best_loss or success:
                best_loss = current
                result.suffix_ids = suffix.tolist()
                result.success = success
        result.losses.append(best_loss)
        result.steps = step + 1
        bar.set_postfix(loss=f"{best_loss:.3f}")
    result.loss = best_loss
    result.suffix = tokenizer.detokenize(result.suffix_ids)
    result.seconds = time.perf_counter() - t0
    return result
