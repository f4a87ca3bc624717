"""Supervised finetuning on the pretraining engine: same model, layouts, checkpoints and loop.

A finetuning run starts from a pretrained checkpoint's weights (not its optimizer or
schedule), reads chat JSONL through :class:`~megatron_srp.data.chat.SFTDataset` (loss on the
answers only) and trains for a number of epochs with its own warmup + cosine schedule. It uses
the same ``train_loop`` as pretraining, so TP/PP/DP, precision, checkpoints and resuming work
the same way: a killed finetune resumes from its own ``checkpoint.save`` directory.

The three uses of the attack suite are recipes (examples/finetune/): instruction tuning, the
benign GSM8K finetune, and the harmful finetuning attack (``finetune.max_records`` pairs).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_srp.config import ConfigError, ExperimentConfig, load_config
from megatron_srp.data.chat import LOSS_ON, ChatFormat, SFTDataset, read_chat_jsonl
from megatron_srp.tokenizer import SRPTokenizer
from megatron_srp.training import checkpoint as ckpt
from megatron_srp.training import parallel
from megatron_srp.training.pretrained import read_pretrained
from megatron_srp.training.trainer import TrainResult, train_loop
from megatron_srp.validation import Platform, resolved_precision, validate

TOKENIZER_SUBDIR = "tokenizer"


def load_finetune_config(path: Optional[str], overrides: Sequence[str]) -> ExperimentConfig:
    """The recipe and overrides on top of the pretrained run's model and sequence length, so a
    recipe names only what finetuning changes. A recipe that sets another model shape is
    refused when the weights are loaded, with the differing fields named."""
    first = load_config(path, list(overrides))
    pretrained = first.finetune.pretrained
    if not pretrained:
        raise ConfigError("finetune.pretrained", "name the pretrained run directory or "
                                                 "checkpoint to start from")
    run = _read_pretrained(pretrained)["config"]
    inherited = {"model": run.get("model", {}),
                 "train": {"seq_length": run.get("train", {}).get("seq_length", 256)}}
    return load_config(path, list(overrides), inherited=inherited)


def _read_pretrained(pretrained: str) -> dict:
    return read_pretrained(pretrained, "finetune.pretrained")[1]


def pretrained_tokenizer(checkpoint: Path) -> SRPTokenizer:
    """The tokenizer saved beside the checkpoint: finetuning must use the pretraining ids."""
    tok_dir = checkpoint.parent / TOKENIZER_SUBDIR
    if not tok_dir.is_dir():
        raise ConfigError("finetune.pretrained", f"no tokenizer beside {checkpoint}: "
                                                 f"expected {tok_dir}")
    return SRPTokenizer.from_dir(tok_dir)


def split_records(conversations: list, valid_records: int, seed: int) -> tuple[list, list]:
    """(train, valid): a seeded shuffle, the last ``valid_records`` held out."""
    if valid_records <= 0:
        return conversations, []
    if valid_records >= len(conversations):
        raise ConfigError("finetune.valid_records", f"{valid_records} held out of only "
                                                    f"{len(conversations)} records")
    order = np.random.default_rng(seed).permutation(len(conversations))
    train = [conversations[i] for i in order[:-valid_records]]
    valid = [conversations[i] for i in order[-valid_records:]]
    return train, valid


class EpochOrder:
    """Global sample ``i`` of the run: epoch ``i // N`` in its own seeded permutation of the N
    finetuning samples. Depends only on ``i``, so any DP size and any resume read the same
    sequence (as in pretraining, see data/gpt_data.py)."""

    def __init__(self, dataset: SFTDataset, seed: int, total: int):
        self.dataset, self.seed, self.total = dataset, seed, total
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.total

    def epoch_of(self, i: int) -> int:
        return i // len(self.dataset)

    def source_index(self, i: int) -> int:
        epoch = self.epoch_of(i)
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(len(self.dataset))
        return int(self._perms[epoch][i % len(self.dataset)])

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.source_index(i)]


class EpochMonitor:
    """Logs each new epoch and reports the epoch position as a metric."""

    def __init__(self, order: EpochOrder, consumed: int):
        self.order, self.consumed = order, consumed

    def advance(self, start: int, count: int) -> list[str]:
        before = self.order.epoch_of(max(start - 1, 0)) if start else -1
        self.consumed = start + count
        after = self.order.epoch_of(start + count - 1)
        return [f"finetune: epoch {e + 1} starts at sample {e * len(self.order.dataset):,}"
                for e in range(before + 1, after + 1) if e > 0]

    def metrics(self) -> dict[str, float]:
        return {"epoch": self.consumed / len(self.order.dataset)}


class ChatData:
    """What ``train_loop`` reads in a finetuning run."""

    def __init__(self, train: SFTDataset, valid: Optional[SFTDataset], cfg: ExperimentConfig,
                 facts: dict):
        self.sft = train
        self.train = EpochOrder(train, cfg.train.seed, cfg.train.train_iters
                                * cfg.train.global_batch_size)
        self.valid = valid
        self.facts = {"finetune": facts}

    def monitor(self, consumed: int) -> EpochMonitor:
        return EpochMonitor(self.train, consumed)

    def describe(self, monitor: EpochMonitor) -> str:
        f = self.facts["finetune"]
        return (f"finetune: {f['train_samples']:,} chat samples from {', '.join(f['data'])} "
                f"({f['truncated']} cut at the sequence length, {f['dropped_without_answer']} "
                f"dropped with no answer left), {f['valid_samples']} held out; "
                f"{f['epochs']:g} epoch(s) from {f['pretrained']}")


def _load_chat(cfg: ExperimentConfig, tokenizer: SRPTokenizer
               ) -> tuple[SFTDataset, Optional[SFTDataset], dict]:
    f = cfg.finetune
    fmt = ChatFormat(prompt_key=f.prompt_key, response_key=f.response_key)
    conversations = []
    for path in f.data:
        conversations += read_chat_jsonl(path, fmt)
    if f.max_records is not None:
        conversations = conversations[:f.max_records]
    train_convs, valid_convs = split_records(conversations, f.valid_records, cfg.train.seed)
    if f.loss_on not in LOSS_ON:
        raise ConfigError("finetune.loss_on", f"must be one of {', '.join(LOSS_ON)}, got "
                                              f"{f.loss_on!r}")
    train = SFTDataset(train_convs, tokenizer, cfg.train.seq_length, f.loss_on)
    if len(train) == 0:
        raise ConfigError("finetune.data", f"no record has a token to train on (loss_on="
                                           f"{f.loss_on}) within train.seq_length="
                                           f"{cfg.train.seq_length}")
    valid = (SFTDataset(valid_convs, tokenizer, cfg.train.seq_length, f.loss_on)
             if valid_convs else None)
    stats = train.stats()
    facts = {"data": list(f.data), "records": len(conversations), "train_samples": len(train),
             "valid_samples": len(valid) if valid else 0, "truncated": stats["truncated"],
             "dropped_without_answer": stats["dropped_without_answer"], "epochs": f.epochs,
             "loss_on": f.loss_on,
             "chat_format": tokenizer.chat.source if tokenizer.chat else "project"}
    return train, valid, facts


def derive_schedule(cfg: ExperimentConfig, train_samples: int) -> None:
    """Steps from epochs (the last, partial batch wraps into the next epoch's order)."""
    t, f = cfg.train, cfg.finetune
    if f.epochs <= 0:
        raise ConfigError("finetune.epochs", f"must be > 0, got {f.epochs}")
    if not 0.0 <= f.warmup_fraction < 1.0:
        raise ConfigError("finetune.warmup_fraction", f"must be in [0, 1), got "
                                                      f"{f.warmup_fraction}")
    t.train_iters = max(1, math.ceil(f.epochs * train_samples / t.global_batch_size))
    t.warmup_iters = min(round(f.warmup_fraction * t.train_iters), t.train_iters - 1)
    t.lr_decay_iters = t.train_iters


def check_finetune(cfg: ExperimentConfig) -> Path:
    """The checkpoint to start from; every finetune key checked, each error naming its key."""
    f = cfg.finetune
    if not f.pretrained:
        raise ConfigError("finetune.pretrained", "name the pretrained run to start from")
    if not f.data:
        raise ConfigError("finetune.data", "give at least one chat JSONL file")
    for i, path in enumerate(f.data):
        if not Path(path).is_file():
            raise ConfigError(f"finetune.data[{i}]", f"{path} does not exist")
    if f.max_records is not None and f.max_records < 1:
        raise ConfigError("finetune.max_records", f"must be >= 1, got {f.max_records}")
    if f.valid_records < 0:
        raise ConfigError("finetune.valid_records", f"must be >= 0, got {f.valid_records}")
    _read_pretrained(f.pretrained)
    return ckpt.resolve_checkpoint(f.pretrained)


def finetune(cfg: ExperimentConfig, platform: Optional[Platform] = None) -> TrainResult:
    """Finetune ``cfg.finetune.pretrained`` on ``cfg.finetune.data`` (see the module doc)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    platform = platform or Platform.detect()
    init = check_finetune(cfg)
    tokenizer = pretrained_tokenizer(init)
    recorded = (ckpt.read_run(init).get("tokenizer") or {}).get("fingerprint")
    if recorded is not None and recorded != tokenizer.fingerprint:
        raise ConfigError("finetune.pretrained", f"the tokenizer beside {init} is not the one "
                                                 f"it was trained with")
    train, valid, facts = _load_chat(cfg, tokenizer)
    facts["pretrained"] = str(init)
    derive_schedule(cfg, len(train))
    if valid is None:
        cfg.train.eval_interval = 0
    validate(cfg, world_size, platform, require_data=False)
    precision = resolved_precision(cfg, platform)

    parallel.initialize(cfg)
    try:
        return train_loop(cfg, tokenizer, precision, platform,
                          lambda c, tok, save: ChatData(train, valid, c, facts), init_weights=init)
    finally:
        ckpt.stop_writer_processes()
        parallel.destroy()
