"""Training and validation samples: Megatron's GPTDataset, read in a DP-independent order.

Global batch ``k`` is always samples ``[k * G, (k + 1) * G)`` of the (shuffled, blended)
Megatron dataset, whatever the data-parallel size: each micro step takes the next
``micro_batch_size * dp`` samples and DP rank ``r`` keeps its ``r``-th slice. So a run resumed
with another DP size, or DP=1 vs DP=2, reads the same global sequence, and resuming only needs
the number of consumed samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_srp.config import ExperimentConfig


def dataset_config(cfg: ExperimentConfig, tokenizer, cache_dir: str | None) -> GPTDatasetConfig:
    d = cfg.data
    return GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        blend=(list(d.paths), list(d.weights) if d.weights is not None else None),
        split=d.split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )


def build_datasets(cfg: ExperimentConfig, tokenizer, cache_dir: str | None):
    """(train, valid) datasets sized for the whole run, built by Megatron's blended builder."""
    t = cfg.train
    train_samples = t.train_iters * t.global_batch_size
    evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval > 0 else 0
    valid_samples = evals * t.eval_iters * t.global_batch_size
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, max(valid_samples, 1), 0], lambda: True,
        dataset_config(cfg, tokenizer, cache_dir))
    train, valid, _ = builder.build()
    return train, valid


@dataclass
class BatchPlan:
    """How a global batch is cut into micro batches on this DP rank."""

    global_batch_size: int
    micro_batch_size: int
    dp_size: int
    dp_rank: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def sample_indices(self, step: int, micro: int) -> list[int]:
        """Global dataset indices of micro batch ``micro`` of global batch ``step`` on this rank."""
        per_micro = self.micro_batch_size * self.dp_size
        start = step * self.global_batch_size + micro * per_micro + self.dp_rank * self.micro_batch_size
        return list(range(start, start + self.micro_batch_size))


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}


def microbatches(dataset, plan: BatchPlan, step: int, wrap: bool = False) -> Iterator[dict]:
    """The micro batches of one global batch for this rank, in schedule order."""
    n = len(dataset)
    for micro in range(plan.num_microbatches):
        idx = plan.sample_indices(step, micro)
        if wrap:
            idx = [i % n for i in idx]
        elif idx[-1] >= n:
            raise IndexError(f"sample {idx[-1]} is past the end of a dataset of {n} samples")
        yield collate([dataset[i] for i in idx])
