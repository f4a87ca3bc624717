"""One training dataset whose blend switches at chosen fractions of the token budget.

Built from Megatron-Core parts: each dataset prefix becomes one ``GPTDataset`` (through
``BlendedMegatronDatasetBuilder``) sized for everything the run draws from it, and each phase is
a ``BlendedDataset`` over *consecutive slices* of those datasets, with the exact per-dataset
counts of :mod:`megatron_srp.data.curriculum_plan`. A dataset that appears in several phases is
therefore read as one stream: phase 2 continues where phase 1 stopped, and nothing repeats
early. Sample ``i`` is ``phase_k[i - start_k]``, a pure function of (config, seed, i), so the
DP-independent batch order of :mod:`megatron_srp.data.gpt_data` and resuming from the number of
consumed samples carry over unchanged.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict, deque
from typing import Any, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset

from megatron_srp.data.curriculum_plan import PhasePlan

logger = logging.getLogger(__name__)


class DatasetSlice:
    """Samples ``[offset, offset + length)`` of one dataset: what a phase blends.

    ``source`` is the prefix's ``GPTDataset``, or just its identifier where only the index is
    built (the benchmark)."""

    def __init__(self, source: Any, offset: int, length: int, split: Any) -> None:
        self.source = source
        self.offset = offset
        self.length = length
        self.index_split = split
        name = getattr(source, "unique_description_hash", source)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("source", name), ("offset", offset),
             ("length", length)])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} outside a slice of {self.length}")
        return self.source[self.offset + index]


class CurriculumDataset(torch.utils.data.Dataset):
    """Global sample ``i`` -> its phase's ``BlendedDataset``; ``dataset_id`` in a sample is the
    index of its prefix in ``prefixes`` (the same in every phase)."""

    def __init__(self, plans: Sequence[PhasePlan], phases: Sequence[BlendedDataset],
                 prefixes: Sequence[str]) -> None:
        self.plans = list(plans)
        self.phases = list(phases)
        self.prefixes = list(prefixes)
        self.starts = [p.start for p in self.plans]
        self._global_id = [np.array([self.prefixes.index(p) for p in plan.counts], dtype=np.int64)
                           for plan in self.plans]

    def __len__(self) -> int:
        return self.plans[-1].end

    def phase_of(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside the run's {len(self)} samples")
        return bisect.bisect_right(self.starts, index) - 1

    def dataset_ids(self, indices: np.ndarray) -> np.ndarray:
        """Prefix index of each global sample, from the blend index alone (no token reads)."""
        indices = np.asarray(indices, dtype=np.int64)
        phase = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty(len(indices), dtype=np.int64)
        for k in np.unique(phase):
            mask = phase == k
            local = self.phases[k].dataset_index[indices[mask] - self.starts[k]]
            out[mask] = self._global_id[k][local]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        k = self.phase_of(index)
        sample = self.phases[k][index - self.starts[k]]
        sample["dataset_id"] = int(self._global_id[k][sample["dataset_id"]])
        return sample


def build_phase_blends(plans: Sequence[PhasePlan], sources: dict[str, Any], split: Any,
                       config: Any) -> list[BlendedDataset]:
    """One ``BlendedDataset`` per phase over consecutive slices of each prefix's dataset,
    drawing exactly ``plan.counts`` samples (Megatron's exhaustive blending interleaves them
    in proportion)."""
    offsets = {prefix: 0 for prefix in sources}
    blends = []
    for plan in plans:
        slices = []
        for prefix, count in plan.counts.items():
            slices.append(DatasetSlice(sources[prefix], offsets[prefix], count, split))
            offsets[prefix] += count
        blends.append(BlendedDataset(slices, list(plan.counts.values()), None, config))
    return blends


def dataset_token_counts(prefixes: Sequence[str]) -> list[float]:
    """Tokens per dataset (from the ``.idx``): the weights of a ``weights: null`` blend."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return [float(IndexedDataset(p, mmap=True).sequence_lengths.sum()) for p in prefixes]


def short_names(prefixes: Sequence[str]) -> list[str]:
    """File names of the prefixes, or the full prefixes where those collide (for logs)."""
    names = [os.path.basename(p) for p in prefixes]
    return names if len(set(names)) == len(names) else list(prefixes)


class BlendMonitor:
    """What the trainer logs about the data: the phase of the latest sample, the share of each
    dataset among the last ``window`` samples, and a line at every phase switch. Computed from
    sample indices (all ranks agree; a resumed run refills the window from the index)."""

    def __init__(self, dataset: CurriculumDataset, window: int, consumed: int) -> None:
        self.dataset = dataset
        self.names = short_names(dataset.prefixes)
        first = max(consumed - window, 0)
        self.recent: deque = deque(dataset.dataset_ids(np.arange(first, consumed)), maxlen=window)
        self.phase = dataset.phase_of(consumed - 1) if consumed > 0 else 0

    def advance(self, start: int, count: int) -> list[str]:
        """Record samples ``[start, start + count)``; return a message per phase switch."""
        self.recent.extend(self.dataset.dataset_ids(np.arange(start, start + count)).tolist())
        messages = []
        last = self.dataset.phase_of(start + count - 1)
        for k in range(self.phase + 1, last + 1):
            plan = self.dataset.plans[k]
            blend = ", ".join(f"{self.names[self.dataset.prefixes.index(p)]} {share:.1%}"
                              for p, share in plan.shares().items())
            messages.append(f"curriculum: phase {k} starts at sample {plan.start:,} "
                            f"({plan.start / len(self.dataset):.1%} of the token budget): {blend}")
        self.phase = last
        return messages

    def metrics(self) -> dict[str, float]:
        counts = np.bincount(np.asarray(self.recent, dtype=np.int64),
                             minlength=len(self.names)) if self.recent else None
        out = {"phase": float(self.phase)}
        for i, name in enumerate(self.names):
            out[f"blend/{name}"] = float(counts[i] / len(self.recent)) if counts is not None else 0.0
        return out


def phase_summary(plans: Sequence[PhasePlan], names: Optional[dict[str, str]] = None) -> str:
    """A table of the phases for the start-of-run log."""
    lines = []
    for plan in plans:
        blend = ", ".join(f"{(names or {}).get(p, p)} {c:,} ({c / plan.size:.1%})"
                          for p, c in plan.counts.items())
        lines.append(f"  phase {plan.index}: samples {plan.start:,}-{plan.end - 1:,} "
                     f"(until {plan.until:g}): {blend}")
    return "\n".join(lines)
