"""What a curriculum costs: its index at pretraining scale, and per-sample fetch time against a
plain Megatron ``BlendedDataset`` (docs/benchmarks.md, "Curriculum datasets").

* **Index at scale** needs sizes only: the phases are planned for the budget and each phase's
  ``BlendedDataset`` index is built over :class:`DatasetSlice` s that name a dataset instead
  of holding one (no token is read, so 600B tokens fit on a laptop). The baseline is the index
  a single-blend Megatron run builds for the same number of samples (``BlendedDataset`` with
  ``size=N`` and the last phase's weights). Each build runs in a fresh *spawned* process, so
  its peak RSS (``ru_maxrss``) is its own and not the previous build's; the index arrays'
  ``nbytes`` are reported beside it, since RSS also holds Python, numpy and torch.
* **Fetch cost** uses real datasets (two corpora from the shared data, preprocessed with the
  project's tool): the same sample indices read from a one-phase and a two-phase
  :class:`CurriculumDataset` and from Megatron's ``BlendedDataset`` over the same corpora.
  The three blend differently, so each also gets a *floor*: the very samples it returned,
  read straight from their ``GPTDataset`` s. And since a token read (~150 µs) wanders more
  between passes on a small VM than the layers cost, each is also timed over constant
  datasets: what the blending layers alone cost.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import queue as queue_mod
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.utils import Split

from megatron_srp.config import DataConfig, PhaseConfig, load_config
from megatron_srp.data.curriculum import CurriculumDataset, DatasetSlice, build_phase_blends
from megatron_srp.data.curriculum_plan import plan_phases

DEFAULT_PHASES = [
    PhaseConfig(until=0.2, blend={"safe": 1.0}),
    PhaseConfig(until=0.6, blend={"safe": 0.7, "reflect": 0.3}),
    PhaseConfig(until=1.0, blend={"safe": 0.5, "reflect": 0.3, "refusal": 0.2}),
]
FETCH_GOAL = 1.10  # the curriculum's per-sample fetch within 10% of Megatron's BlendedDataset


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout is the report alone."""
    print(msg, file=sys.stderr, flush=True)


def parse_curriculum(text: str) -> list[PhaseConfig]:
    """A curriculum written as in a config (``[{until: 0.5, blend: {a: 1.0}}, ...]``), parsed
    by :func:`load_config` so the CLI gets the same type checks as a run."""
    return load_config(None, [f"data.curriculum={text}"]).data.curriculum


def _rss_mb() -> float:
    """Current RSS (not the peak) of this process, from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def _drawn(dataset_index: np.ndarray, n: int, chunk: int = 1 << 24) -> list[int]:
    """Samples per dataset in an index, counted in chunks (a bincount of the whole int16
    array would cast it to int64 first: 4x its size)."""
    out = np.zeros(n, dtype=np.int64)
    for s in range(0, len(dataset_index), chunk):
        out += np.bincount(dataset_index[s:s + chunk], minlength=n)
    return out.tolist()


def _build_index(kind: str, phases: Sequence[PhaseConfig], samples: int, seq_length: int,
                 out: Any) -> None:
    """Child process: build one index; report seconds, array bytes, RSS and per-phase counts."""
    # path_to_cache=None: build in memory, never touch torch.distributed or the disk.
    config = BlendedMegatronDatasetConfig(random_seed=1234, sequence_length=seq_length,
                                          blend=(["index-only"], None), split="100,0,0")
    rss_before = _rss_mb()
    start = time.perf_counter()
    if kind == "curriculum":
        plans = plan_phases(DataConfig(curriculum=list(phases)), samples)
        prefixes = list(dict.fromkeys(p for phase in phases for p in phase.blend))
        blends = build_phase_blends(plans, {p: p for p in prefixes}, Split.train, config)
        parts = [{"phase": p.index, "start": p.start, "end": p.end, "planned": p.counts}
                 for p in plans]
    else:
        last = {p: w for p, w in phases[-1].blend.items() if w > 0}
        slices = [DatasetSlice(p, 0, samples, Split.train) for p in last]
        blends = [BlendedDataset(slices, list(last.values()), samples, config)]
        parts = [{"phase": None, "start": 0, "end": samples, "weights": last}]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    for part, blend in zip(parts, blends):  # after the peak was read: not part of it
        names = [d.source for d in blend.datasets]
        part.update(samples=len(blend), index_bytes=int(blend.dataset_index.nbytes
                                                        + blend.dataset_sample_index.nbytes),
                    drawn=dict(zip(names, _drawn(blend.dataset_index, len(names)))))
    out.put({"kind": kind, "samples": sum(p["samples"] for p in parts), "seconds": seconds,
             "index_bytes": sum(p["index_bytes"] for p in parts), "peak_rss_mb": peak,
             "rss_before_mb": rss_before, "rss_delta_mb": peak - rss_before, "phases": parts})


def index_at_scale(budget_tokens: float, seq_length: int,
                   phases: Sequence[PhaseConfig] = DEFAULT_PHASES) -> list[dict[str, Any]]:
    """Build the curriculum index and the single-blend baseline for ``budget_tokens``, each in
    a fresh spawned process; returns one result dict per build."""
    samples = int(budget_tokens // seq_length)
    results = []
    ctx = mp.get_context("spawn")
    for kind in ("curriculum", "megatron-blend"):
        log(f"  {kind}: building the index of {samples:,} samples in a fresh process ...")
        results_q = ctx.Queue()
        proc = ctx.Process(target=_build_index,
                           args=(kind, list(phases), samples, seq_length, results_q))
        proc.start()
        while True:  # a child killed (e.g. out of memory) never answers: do not wait forever
            try:
                result = results_q.get(timeout=1.0)
                break
            except queue_mod.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the {kind} index build died (exit code "
                                       f"{proc.exitcode}; -9 is usually out of memory)") from None
        proc.join()
        log(f"    {result['seconds']:.1f} s, index arrays {result['index_bytes'] / 1e9:.2f} GB, "
            f"peak RSS {result['peak_rss_mb'] / 1024:.2f} GiB")
        results.append({**result, "budget_tokens": budget_tokens, "seq_length": seq_length})
    return results


def _reader(pairs: Sequence[tuple[Any, int]]) -> Callable[[int, int], None]:
    """Reads ``obj[i]`` for the pairs ``[a:b]``, one sample at a time as a training loop does
    (the same loop for datasets and their floors, so the loop costs alike)."""
    def read(a: int, b: int) -> None:
        for obj, i in pairs[a:b]:
            obj[i]
    return read


class _Constant:
    """Stands in for a GPTDataset: one prebuilt sample, so only the layers above are timed."""

    def __init__(self, sample: dict) -> None:
        self.sample = sample

    def __getitem__(self, index: int) -> dict:
        return dict(self.sample)


def _layers_only(dataset: Any, sample: dict) -> Any:
    """The same blend and lookups as ``dataset``, over :class:`_Constant` datasets."""
    if isinstance(dataset, CurriculumDataset):
        return CurriculumDataset(dataset.plans, [_layers_only(p, sample) for p in dataset.phases],
                                 dataset.prefixes)
    blend = copy.copy(dataset)
    blend.datasets = [copy.copy(d) if isinstance(d, DatasetSlice) else _Constant(sample)
                      for d in dataset.datasets]
    for part in blend.datasets:
        if isinstance(part, DatasetSlice):
            part.source = _Constant(sample)  # keeps the slice's bounds check and offset
    return blend


def _interleaved(readers: dict[Any, Callable[[int, int], None]], n: int, repeats: int,
                 chunk: int = 500) -> dict[Any, list[float]]:
    """Seconds per pass of each reader over ``n`` samples, run chunk by chunk in a fresh random
    order per chunk, so drift over the run (this VM's passes wander by +-20%) hits all alike."""
    rng = np.random.default_rng(1)
    keys = list(readers)
    out = {k: [0.0] * repeats for k in keys}
    for rep in range(repeats):
        for a in range(0, n, chunk):
            for k in rng.permutation(len(keys)):
                t = time.perf_counter()
                readers[keys[k]](a, min(a + chunk, n))
                out[keys[k]][rep] += time.perf_counter() - t
        log(f"  pass {rep + 1}/{repeats}: " + ", ".join(
            f"{k[1]} {1e6 * out[k][rep] / n:.1f} µs" for k in keys if k[0] == "fetch"))
    return out


def _underlying(dataset: Any, indices: np.ndarray) -> list[tuple[Any, int]]:
    """(GPTDataset, its sample index) behind each global index: what a read costs without the
    blending layers, the floor each dataset's time is compared with."""
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
                   seq_length: int = 2048, order: str = "random") -> dict[str, Any]:
    """µs per sample for the same indices from Megatron's BlendedDataset and from one- and
    two-phase curricula of the same 50/50 blend over the same two preprocessed corpora, beside
    each one's floor and its layers alone (medians of ``repeats`` interleaved passes)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_srp.data.gpt_data import build_datasets, dataset_config
    from megatron_srp.data.preprocess import preprocess
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

    if order not in ("random", "sequential"):
        raise ValueError(f"order must be random or sequential, not {order!r}")
    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    prefixes = []
    for name, source in (("shakespeare", "tinyshakespeare/input.txt"),
                         ("wiki", "wikitext2/test.txt")):
        prefix = work_dir / name
        if not Path(f"{prefix}.meta.json").is_file():
            log(f"  preprocessing {data_dir / source} -> {prefix} ...")
            preprocess([data_dir / source], prefix, tok, progress=False, overwrite=True)
        prefixes.append(str(prefix))
    iters = max(-(-samples // 8), 2)  # global batches of 8; at least ``samples`` in all
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
    log(f"  building the three datasets ({total:,} samples each) ...")
    datasets = {
        "megatron-blend": BlendedMegatronDatasetBuilder(
            GPTDataset, [total, 1, 0], lambda: True,
            dataset_config(one_phase, tok, None)).build()[0],
        "curriculum-1-phase": build_datasets(one_phase, tok, None)[0],
        "curriculum-2-phases": build_datasets(two_phase, tok, None)[0],
    }
    indices = (np.random.default_rng(0).permutation(total) if order == "random"
               else np.arange(total))[:samples]
    sample = datasets["megatron-blend"].datasets[0][0]
    readers: dict[tuple[str, str], Callable[[int, int], None]] = {}
    for name, dataset in datasets.items():
        readers["fetch", name] = _reader([(dataset, int(i)) for i in indices])
        readers["direct", name] = _reader(_underlying(dataset, indices))
        layers_only = _layers_only(dataset, sample)
        readers["layers", name] = _reader([(layers_only, int(i)) for i in indices])
    for read in readers.values():  # warm the page cache and lazy state alike
        read(0, 1000)
    times = _interleaved(readers, len(indices), repeats)
    per = lambda t: 1e6 * float(np.median(t)) / len(indices)  # noqa: E731
    us, direct, layers = ({n: per(times[kind, n]) for n in datasets}
                          for kind in ("fetch", "direct", "layers"))
    relative = {n: us[n] / direct[n] for n in us}  # cost over reading the same samples directly
    meg = "megatron-blend"
    return {"samples": len(indices), "repeats": repeats, "seq_length": seq_length,
            "order": order, "us_per_sample": us, "direct_us_per_sample": direct,
            "best_us_per_sample": {n: 1e6 * min(times["fetch", n]) / len(indices) for n in us},
            "layers_us_per_sample": layers,
            "overhead_us": {n: us[n] - direct[n] for n in us},
            "raw_ratio_to_megatron": {n: us[n] / us[meg] for n in us},
            "ratio_to_megatron": {n: relative[n] / relative[meg] for n in us},
            # Megatron's measured fetch plus what this dataset's layers add over Megatron's
            "layers_ratio_to_megatron": {n: (us[meg] + layers[n] - layers[meg]) / us[meg]
                                         for n in us},
            "all_seconds": {f"{k[0]}/{k[1]}": v for k, v in times.items()}}


def markdown(index: Optional[list[dict]], fetch: Optional[dict], header: str) -> str:
    lines = [f"# Curriculum dataset benchmark\n\n{header}\n"]
    if index:
        lines += ["## Index build (sizes only)\n",
                  f"Budget {index[0]['budget_tokens']:.3g} tokens at sequence length "
                  f"{index[0]['seq_length']} = {index[0]['samples']:,} samples. Seconds: "
                  "planning plus index build. Peak RSS: the build's fresh process (Python and "
                  "imports included); delta: peak minus its RSS just before the build.\n",
                  "| index | samples | seconds | index arrays GB | peak RSS GiB | "
                  "RSS delta GiB |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['kind']} | {r['samples']:,} | {r['seconds']:.2f} | "
                  f"{r['index_bytes'] / 1e9:.2f} | {r['peak_rss_mb'] / 1024:.2f} | "
                  f"{r['rss_delta_mb'] / 1024:.2f} |" for r in index]
        lines += ["", "| index | phase | samples | planned | drawn by the index |",
                  "|---|---|---|---|---|"]
        counts = lambda d, fmt: ", ".join(f"{k} {v:{fmt}}" for k, v in d.items())  # noqa
        lines += [f"| {r['kind']} | {'-' if p['phase'] is None else p['phase']} | "
                  f"{p['start']:,}-{p['end'] - 1:,} | " + (
                      counts(p["planned"], ",") if "planned" in p else
                      "weights " + counts(p["weights"], "g")) + f" | {counts(p['drawn'], ',')} |"
                  for r in index for p in r["phases"]]
        lines.append("")
    if fetch:
        lines += ["## Per-sample fetch\n",
                  f"{fetch['samples']:,} {fetch.get('order', 'random')} indices, sequence "
                  f"length {fetch['seq_length']}, median of {fetch['repeats']} passes, the "
                  "readers interleaved in chunks of 500 samples in random order.\n",
                  "*direct*: the samples each returned, read straight from their GPTDatasets; "
                  "*vs Megatron*: (time / direct) over Megatron's; *layers only*: the same "
                  "indices over constant datasets; *layers estimate*: (Megatron's time + the "
                  "difference in layers) / Megatron's time.\n",
                  "| dataset | µs per sample | best pass µs | direct µs | overhead µs | "
                  "raw ratio | vs Megatron | layers only µs | layers estimate |",
                  "|---|---|---|---|---|---|---|---|---|"]
        f = fetch
        lines += [f"| {n} | {us:.1f} | {f['best_us_per_sample'][n]:.1f} | "
                  f"{f['direct_us_per_sample'][n]:.1f} | {f['overhead_us'][n]:.1f} | "
                  f"{f['raw_ratio_to_megatron'][n]:.3f}x | {f['ratio_to_megatron'][n]:.3f}x | "
                  f"{f['layers_us_per_sample'][n]:.2f} | {f['layers_ratio_to_megatron'][n]:.3f}x |"
                  for n, us in f["us_per_sample"].items()]
        worst = lambda key: max(v for n, v in f[key].items() if n != "megatron-blend")  # noqa
        passes = f["all_seconds"]["fetch/megatron-blend"]
        spread = (max(passes) - min(passes)) / float(np.median(passes))
        est, e2e = worst("layers_ratio_to_megatron"), worst("ratio_to_megatron")
        lines += ["", f"Goal (fetch within {FETCH_GOAL - 1:.0%} of Megatron's BlendedDataset): "
                  f"{'met' if est <= FETCH_GOAL else 'NOT met'} by the layers estimate (worst "
                  f"{est:.3f}x); end to end, time over direct: worst {e2e:.3f}x "
                  f"({'within' if e2e <= FETCH_GOAL else 'outside'} the goal), with Megatron's "
                  f"own passes spread over {spread:.0%} of their median.", ""]
    return "\n".join(lines)
