"""Training and validation samples: Megatron's GPTDataset, read in a DP-independent order.

The training set is a :class:`~megatron_srp.data.curriculum.CurriculumDataset` (a plain blend
is its one-phase case), sized to the run.

Global batch ``k`` is always samples ``[k * G, (k + 1) * G)`` of the (shuffled, blended)
Megatron dataset, whatever the data-parallel size: each micro step takes the next
``micro_batch_size * dp`` samples and DP rank ``r`` keeps its ``r``-th slice. So a run resumed
with another DP size, or DP=1 vs DP=2, reads the same global sequence, and resuming only needs
the number of consumed samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_srp.config import ExperimentConfig
from megatron_srp.data.curriculum import (
    CurriculumDataset, build_phase_blends, dataset_token_counts,
)
from megatron_srp.data.curriculum_plan import plan_phases


def dataset_config(cfg: ExperimentConfig, tokenizer, cache_dir: str | None,
                   blend: Optional[tuple[list[str], Optional[list[float]]]] = None
                   ) -> GPTDatasetConfig:
    d = cfg.data
    if blend is None:
        blend = (list(d.paths), list(d.weights) if d.weights is not None else None)
    return GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        blend=blend,
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
    """(train, valid): the train set is a :class:`CurriculumDataset` (one phase for a plain
    blend) of exactly ``train_iters x global_batch_size`` samples; validation reads the last
    phase's blend, built by Megatron's blended builder."""
    t, d = cfg.train, cfg.data
    total = t.train_iters * t.global_batch_size
    prefixes = d.prefixes()
    default_weights = (dataset_token_counts(d.paths)
                       if not d.curriculum and d.weights is None and len(d.paths) > 1 else None)
    plans = plan_phases(d, total, default_weights)
    needed = {p: sum(plan.counts.get(p, 0) for plan in plans) for p in prefixes}
    sources = {}
    for prefix in prefixes:
        if needed[prefix]:
            built = BlendedMegatronDatasetBuilder(
                GPTDataset, [needed[prefix], 1, 0], lambda: True,
                dataset_config(cfg, tokenizer, cache_dir, ([prefix], None))).build()
            sources[prefix] = built[0]
    config = dataset_config(cfg, tokenizer, cache_dir, (prefixes, None))
    split = next(iter(sources.values())).index_split
    train = CurriculumDataset(plans, build_phase_blends(plans, sources, split, config), prefixes)

    evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval > 0 else 0
    valid_samples = max(evals * t.eval_iters * t.global_batch_size, 1)
    last = plans[-1].counts
    valid_blend = ((list(d.paths), list(d.weights) if d.weights is not None else None)
                   if not d.curriculum else (list(last), [float(c) for c in last.values()]))
    _, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [1, valid_samples, 0], lambda: True,
        dataset_config(cfg, tokenizer, cache_dir, valid_blend)).build()
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
