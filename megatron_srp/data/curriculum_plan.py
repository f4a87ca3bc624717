"""A curriculum's phases as exact sample ranges and per-dataset sample counts (pure: no
Megatron, no torch, no files), so the config can be checked before anything starts.

The run's training samples form one index space ``0 .. N-1`` (``N = train_iters x
global_batch_size``), each sample ``seq_length`` tokens of the budget. **Sample ``i`` belongs to
the phase in which its first token falls**: phase ``k`` ends before sample
``ceil(until_k x N)``, so the switch happens at the sample whose tokens reach the fraction.

Inside a phase every dataset gets an exact whole number of samples: the phase's weights times
its size, rounded by largest remainder (ties to the earlier dataset). ``match_tokens`` pins a
dataset's total over the run instead: ``fraction x N`` samples, spread over the phases that
name it in proportion to their sizes; the other datasets of those phases share what is left
by their weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

from megatron_srp.config import ConfigError, DataConfig, PhaseConfig


@dataclass(frozen=True)
class PhasePlan:
    """Phase ``index`` covers global samples ``[start, end)``; ``counts`` says how many come
    from each dataset prefix (datasets with none are left out), in blend order."""

    index: int
    start: int
    end: int
    until: float
    counts: dict[str, int]

    @property
    def size(self) -> int:
        return self.end - self.start

    def shares(self) -> dict[str, float]:
        return {p: c / self.size for p, c in self.counts.items()}


def phases_of(data: DataConfig, default_weights: Optional[Sequence[float]] = None
              ) -> list[PhaseConfig]:
    """The curriculum, or the single blend ``paths`` + ``weights`` as its one phase.

    ``weights: null`` with several paths blends by ``default_weights`` (the caller passes the
    datasets' token counts; validation, which only checks structure, passes nothing and gets
    equal weights)."""
    if data.curriculum:
        return list(data.curriculum)
    weights = data.weights
    if weights is None:
        weights = list(default_weights) if default_weights is not None else [1.0] * len(data.paths)
    return [PhaseConfig(until=1.0, blend=dict(zip(data.paths, (float(w) for w in weights))))]


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Whole numbers summing to ``total`` in proportion to ``weights`` (ties: earlier first)."""
    weight_sum = math.fsum(weights)
    raw = [total * w / weight_sum for w in weights]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _fraction(value: float) -> Fraction:
    """The decimal the user wrote (0.6, not 0.59999999999999998)."""
    return Fraction(repr(float(value)))


def plan_phases(data: DataConfig, total_samples: int,
                default_weights: Optional[Sequence[float]] = None) -> list[PhasePlan]:
    """Check the curriculum and turn it into :class:`PhasePlan` s. Raises :class:`ConfigError`
    naming the key for every rule it breaks."""
    if data.curriculum and (data.paths or data.weights is not None):
        raise ConfigError("data.curriculum", "give either data.paths (+ data.weights) for one "
                          "blend or data.curriculum for phases, not both")
    if not data.curriculum and not data.paths:
        raise ConfigError("data.paths", "no dataset given (a list of <prefix> of .bin/.idx, "
                          "or data.curriculum)")
    phases = phases_of(data, default_weights)
    previous = Fraction(0)
    bounds = [0]
    for k, phase in enumerate(phases):
        key = f"data.curriculum[{k}]" if data.curriculum else "data.weights"
        blend_key = f"{key}.blend" if data.curriculum else key
        until = _fraction(phase.until)
        if not previous < until <= 1:
            raise ConfigError(f"{key}.until", f"{phase.until} must be above the previous phase's "
                              f"end ({float(previous)}) and at most 1.0")
        if not phase.blend:
            raise ConfigError(blend_key, "the blend is empty")
        for prefix, weight in phase.blend.items():
            if not weight >= 0:  # also catches NaN
                raise ConfigError(f"{blend_key}.{prefix}" if data.curriculum else key,
                                  f"weights must be non-negative, got {weight}")
        if not sum(phase.blend.values()) > 0:
            raise ConfigError(blend_key, f"weights sum to zero: {dict(phase.blend)}")
        end = math.ceil(until * total_samples)
        if end <= bounds[-1]:
            raise ConfigError(f"{key}.until", f"phase {k} gets no samples with a budget of "
                              f"{total_samples} samples (train.train_iters x "
                              "train.global_batch_size)")
        bounds.append(end)
        previous = until
    if previous != 1:
        raise ConfigError(f"data.curriculum[{len(phases) - 1}].until",
                          f"the last phase must end at 1.0, not {float(previous)}")
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    counts = _counts(phases, sizes, data.match_tokens, total_samples)
    return [PhasePlan(k, bounds[k], bounds[k + 1], float(phases[k].until), counts[k])
            for k in range(len(phases))]


def _counts(phases: Sequence[PhaseConfig], sizes: Sequence[int], match: dict[str, float],
            total_samples: int) -> list[dict[str, int]]:
    """Per phase: samples per dataset (see the module docstring)."""
    pinned: list[dict[str, int]] = [{} for _ in phases]
    for prefix, fraction in match.items():
        key = f"data.match_tokens.{prefix}"
        if not 0 < fraction <= 1:
            raise ConfigError(key, f"a fraction of the train budget in (0, 1], got {fraction}")
        where = [k for k, p in enumerate(phases) if p.blend.get(prefix, 0) > 0]
        if not where:
            raise ConfigError(key, f"{prefix} is in no phase's blend with a positive weight")
        target = round(_fraction(fraction) * total_samples)
        room = sum(sizes[k] for k in where)
        if target > room:
            raise ConfigError(key, f"{target} samples ({fraction} of {total_samples}) do not fit "
                              f"in the {room} samples of the phases that name {prefix}")
        for k, n in zip(where, largest_remainder(target, [sizes[k] for k in where])):
            pinned[k][prefix] = n
    out = []
    for k, (phase, size) in enumerate(zip(phases, sizes)):
        fixed = pinned[k]
        left = size - sum(fixed.values())
        if left < 0:
            raise ConfigError("data.match_tokens", f"{', '.join(fixed)} together need "
                              f"{sum(fixed.values())} samples of phase {k}, which has {size}")
        free = {p: w for p, w in phase.blend.items() if p not in fixed and w > 0}
        if left and not free:
            raise ConfigError("data.match_tokens", f"phase {k} holds only matched datasets and "
                              f"they fill {size - left} of its {size} samples; add a dataset to "
                              "its blend for the rest")
        shares = dict(zip(free, largest_remainder(left, list(free.values())))) if free else {}
        counts = {p: fixed.get(p, shares.get(p, 0)) for p in phase.blend}
        out.append({p: c for p, c in counts.items() if c > 0})
    return out
