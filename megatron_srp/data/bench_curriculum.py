"""What a curriculum costs: its index at pretraining scale, and per-sample fetch time against a
plain Megatron ``BlendedDataset`` (docs/benchmarks.md, "Curriculum datasets").

* **Index at scale** needs sizes only: the phases are planned for the budget and each phase's
  ``BlendedDataset`` index is built over :class:`DatasetSlice` s that name a dataset instead
  of holding one. The baseline is the index a single-blend Megatron run builds for the same
  number of samples (``BlendedDataset`` with ``size=N`` and the last phase's weights). Each
  build runs in a fresh process, so its peak memory is its own.
* **Fetch cost** uses real datasets (two corpora from the shared data, preprocessed with the
  project's tool): the same sample indices read from a one-phase and a two-phase
  :class:`CurriculumDataset` and from Megatron's ``BlendedDataset`` over the same GPTDatasets.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megatron_srp.config import DataConfig, PhaseConfig

DEFAULT_PHASES = [
    PhaseConfig(until=0.2, blend={"safe": 1.0}),
    PhaseConfig(until=0.6, blend={"safe": 0.7, "reflect": 0.3}),
    PhaseConfig(until=1.0, blend={"safe": 0.5, "reflect": 0.3, "refusal": 0.2}),
]


def _blend_config():
    from megatron.core.datasets.blended_megatron_dataset_config import (
        BlendedMegatronDatasetConfig,
    )
    return BlendedMegatronDatasetConfig(random_seed=1234, sequence_length=2048,
                                        blend=(["index-only"], None), split="100,0,0")


def _build_index(kind: str, phases: Sequence[PhaseConfig], samples: int, out: Any) -> None:
    """Child process: build one index, report seconds, array bytes and peak RSS."""
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.utils import Split

    from megatron_srp.data.curriculum import DatasetSlice, build_phase_blends
    from megatron_srp.data.curriculum_plan import plan_phases

    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if kind == "curriculum":
        plans = plan_phases(DataConfig(curriculum=list(phases)), samples)
        prefixes = list(dict.fromkeys(p for phase in phases for p in phase.blend))
        blends = build_phase_blends(plans, {p: p for p in prefixes}, Split.train,
                                    _blend_config())
        length = sum(len(b) for b in blends)
    else:
        last = phases[-1].blend
        slices = [DatasetSlice(p, 0, samples, Split.train) for p in last]
        blends = [BlendedDataset(slices, list(last.values()), samples, _blend_config())]
        length = len(blends[0])
    seconds = time.perf_counter() - start
    nbytes = sum(b.dataset_index.nbytes + b.dataset_sample_index.nbytes for b in blends)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.put({"kind": kind, "samples": length, "seconds": seconds, "index_bytes": nbytes,
             "peak_rss_mb": peak / 1024, "rss_before_mb": start_rss / 1024})


def index_at_scale(budget_tokens: float, seq_length: int,
                   phases: Sequence[PhaseConfig] = DEFAULT_PHASES) -> list[dict[str, Any]]:
    """Build the curriculum index and the single-blend baseline for ``budget_tokens``, each in
    a fresh spawned process; returns one result dict per build."""
    samples = int(budget_tokens // seq_length)
    results = []
    ctx = mp.get_context("spawn")
    for kind in ("curriculum", "megatron-blend"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_build_index, args=(kind, list(phases), samples, queue))
        proc.start()
        result = queue.get()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"the {kind} index build failed (exit code {proc.exitcode})")
        results.append({**result, "budget_tokens": budget_tokens, "seq_length": seq_length})
    return results


def _fetch_seconds(dataset: Any, indices: Sequence) -> float:
    start = time.perf_counter()
    for i in indices:
        dataset[int(i)]
    return time.perf_counter() - start


def _direct_seconds(reads: Sequence[tuple[Any, int]]) -> float:
    start = time.perf_counter()
    for source, j in reads:
        source[j]
    return time.perf_counter() - start


def _underlying(dataset: Any, indices: np.ndarray) -> list[tuple[Any, int]]:
    """(GPTDataset, its sample index) behind each global index: what a read costs without the
    blending layers, the floor each dataset's time is compared with."""
    from megatron_srp.data.curriculum import CurriculumDataset

    out = []
    for i in map(int, indices):
        blend = dataset
        if isinstance(dataset, CurriculumDataset):
            k = dataset.phase_of(i)
            blend, i = dataset.phases[k], i - dataset.starts[k]
        part = blend.datasets[blend.dataset_index[i]]
        j = int(blend.dataset_sample_index[i])
        out.append((part.source, part.offset + j) if hasattr(part, "offset") else (part, j))
    return out


def fetch_overhead(data_dir: Path, work_dir: Path, samples: int = 20_000, repeats: int = 5,
                   seq_length: int = 2048) -> dict[str, Any]:
    """µs per sample for the same indices from Megatron's BlendedDataset and from one- and
    two-phase curricula of the same 50/50 blend over the same two preprocessed corpora (medians
    of ``repeats``, interleaved so drift hits all three alike)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_srp.config import load_config
    from megatron_srp.data.gpt_data import build_datasets, dataset_config
    from megatron_srp.data.preprocess import preprocess
    from megatron_srp.data.tokenizer import SRPTokenizer, default_tokenizer_dir

    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    prefixes = []
    for name, source in (("shakespeare", "tinyshakespeare/input.txt"),
                         ("wiki", "wikitext2/test.txt")):
        prefix = work_dir / name
        if not Path(f"{prefix}.meta.json").is_file():
            preprocess([data_dir / source], prefix, tok, progress=False, overwrite=True)
        prefixes.append(str(prefix))
    iters = max(samples // 8, 2)
    base = [f"train.train_iters={iters}", "train.global_batch_size=8",
            "train.micro_batch_size=8", f"train.seq_length={seq_length}", "train.warmup_iters=1"]
    one_phase = load_config(None, [*base, f"data.paths=[{prefixes[0]},{prefixes[1]}]",
                                   "data.weights=[0.5,0.5]"])
    # The same 50/50 blend in both phases: the switch and the phase lookup are exercised, but
    # the samples read have the mix of the other two (a sample's cost depends on its dataset).
    half = f"{{{prefixes[0]}: 0.5, {prefixes[1]}: 0.5}}"
    two_phase = load_config(None, [*base, f"data.curriculum=[{{until: 0.5, blend: {half}}}, "
                                   f"{{until: 1.0, blend: {half}}}]"])
    total = iters * 8
    datasets = {
        "megatron-blend": BlendedMegatronDatasetBuilder(
            GPTDataset, [total, 1, 0], lambda: True,
            dataset_config(one_phase, tok, None)).build()[0],
        "curriculum-1-phase": build_datasets(one_phase, tok, None)[0],
        "curriculum-2-phases": build_datasets(two_phase, tok, None)[0],
    }
    indices = np.random.default_rng(0).permutation(total)[:samples]
    for dataset in datasets.values():  # warm the page cache and lazy state alike
        _fetch_seconds(dataset, indices[:1000])
    reads = {name: _underlying(dataset, indices) for name, dataset in datasets.items()}
    times: dict[str, list[float]] = {name: [] for name in datasets}
    floors: dict[str, list[float]] = {name: [] for name in datasets}
    for _ in range(repeats):
        for name, dataset in datasets.items():
            times[name].append(_fetch_seconds(dataset, indices))
            floors[name].append(_direct_seconds(reads[name]))
    us = {n: 1e6 * float(np.median(t)) / len(indices) for n, t in times.items()}
    direct = {n: 1e6 * float(np.median(t)) / len(indices) for n, t in floors.items()}
    relative = {n: us[n] / direct[n] for n in us}  # cost over reading the same samples directly
    return {"samples": len(indices), "repeats": repeats, "seq_length": seq_length,
            "us_per_sample": us, "direct_us_per_sample": direct,
            "overhead_us": {n: us[n] - direct[n] for n in us},
            "ratio_to_megatron": {n: relative[n] / relative["megatron-blend"] for n in us},
            "all_seconds": times, "all_direct_seconds": floors}


def markdown(index: Optional[list[dict]], fetch: Optional[dict], header: str) -> str:
    lines = [f"# Curriculum dataset benchmark\n\n{header}\n"]
    if index:
        lines += ["## Index build (sizes only)\n",
                  f"Budget {index[0]['budget_tokens']:.3g} tokens at sequence length "
                  f"{index[0]['seq_length']} = {index[0]['samples']:,} samples.\n",
                  "| index | samples | seconds | index arrays GB | peak RSS GB |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['kind']} | {r['samples']:,} | {r['seconds']:.1f} | "
                  f"{r['index_bytes'] / 1e9:.2f} | {r['peak_rss_mb'] / 1024:.2f} |" for r in index]
        lines.append("")
    if fetch:
        lines += ["## Per-sample fetch\n",
                  f"{fetch['samples']:,} random indices, sequence length {fetch['seq_length']}, "
                  f"median of {fetch['repeats']} passes.\n",
                  "Each dataset's time is also compared with reading the very samples it "
                  "returns straight from their GPTDatasets (the floor): the last column is "
                  "(time / floor) over Megatron's (time / floor).\n",
                  "| dataset | µs per sample | same samples read directly, µs | overhead µs |"
                  " vs Megatron BlendedDataset |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {us:.1f} | {fetch['direct_us_per_sample'][name]:.1f} | "
                  f"{fetch['overhead_us'][name]:.1f} | {fetch['ratio_to_megatron'][name]:.3f}x |"
                  for name, us in fetch["us_per_sample"].items()]
        lines.append("")
    return "\n".join(lines)
