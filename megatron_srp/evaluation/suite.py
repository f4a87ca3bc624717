"""The evaluation runner behind ``tools/evaluate_srp.py``: suites over checkpoints, resumable.

A run is a list of **units**, one per (checkpoint, measurement): last-token activations,
reflection accuracy by each method, linear probes. Each finished unit is written to
``<out_dir>/units/<checkpoint>/<unit>.json`` atomically, stamped (megatron_srp/units.py) with a
hash of everything it depends on: the checkpoint (path, iteration, the stamp of the step that
trained it), the data, the suite's settings and the metrics' version. A rerun skips units whose
stamp matches, so an interrupted run picks up where it stopped and a changed setting recomputes
only what it touches. A checkpoint is loaded only when one of its units is missing. After the
units, the report is rebuilt from them: ``results.json``, ``report.md`` and plots.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from megatron_srp.config import ConfigError, load_yaml_config
from megatron_srp.units import Units, run_stamp, stamp, unit_stamp, write_atomic

__all__ = ["EvalConfig", "load_eval_config", "run_evaluation", "stamp", "write_atomic"]

# In every unit's stamp: bump it on any change to how reflection accuracy or the probes are
# computed, and stored units are computed again.
METRIC_VERSION = 1


@dataclass
class CheckpointSpec:
    name: str = "???"
    path: str = "???"


@dataclass
class DataSpec:
    labels: str = "???"            # dataset prefix with a <prefix>.labels.jsonl sidecar
    context: str = "segment"       # segment | document
    max_segments: Optional[int] = 1000
    seed: int = 0


@dataclass
class ReflectionSuite:
    enabled: bool = True
    methods: list[str] = field(default_factory=lambda: ["reflection", "few_shot", "probe"])
    shots: int = 8
    batch_size: int = 16


@dataclass
class ProbeSuite:
    enabled: bool = True
    layers: list[str] = field(default_factory=lambda: ["first", "middle", "last"])
    n_train_per_class: int = 500
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])


@dataclass
class EvalConfig:
    out_dir: str = "???"
    checkpoints: list[CheckpointSpec] = field(default_factory=list)
    data: DataSpec = field(default_factory=DataSpec)
    reflection: ReflectionSuite = field(default_factory=ReflectionSuite)
    probes: ProbeSuite = field(default_factory=ProbeSuite)


def load_eval_config(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> EvalConfig:
    """The YAML file merged over the defaults, ``key=value`` overrides on top; unknown keys,
    missing required keys and impossible values are ConfigErrors naming the key."""
    cfg = load_yaml_config(EvalConfig, path, overrides)
    assert isinstance(cfg, EvalConfig)
    _validate(cfg)
    return cfg


def _validate(cfg: EvalConfig) -> None:
    from megatron_srp.evaluation.reflection_accuracy import CONTEXTS, METHODS

    if not cfg.checkpoints:
        raise ConfigError("checkpoints", "name at least one checkpoint ({name, path})")
    names = [c.name for c in cfg.checkpoints]
    if len(set(names)) != len(names):
        raise ConfigError("checkpoints", f"checkpoint names must be unique, got {names}")
    for i, c in enumerate(cfg.checkpoints):
        if not c.name or "/" in c.name:
            raise ConfigError(f"checkpoints[{i}].name", f"not a usable name: {c.name!r}")
    if cfg.data.context not in CONTEXTS:
        raise ConfigError("data.context", f"must be one of {CONTEXTS}, got {cfg.data.context!r}")
    unknown = sorted(set(cfg.reflection.methods) - set(METHODS))
    if unknown:
        raise ConfigError("reflection.methods", f"unknown {unknown}; choose from {METHODS}")
    bad_layers = sorted(set(cfg.probes.layers) - {"first", "middle", "last"})
    if bad_layers:
        raise ConfigError("probes.layers", f"unknown {bad_layers}; use first, middle, last")
    if not cfg.probes.seeds:
        raise ConfigError("probes.seeds", "at least one seed")


class _Checkpoint:
    """A checkpoint's units; the model is loaded on first need and dropped after."""

    def __init__(self, spec: CheckpointSpec, cfg: EvalConfig, fingerprint: str) -> None:
        from megatron_srp.training import checkpoint as ckpt

        self.spec = spec
        self.fingerprint = fingerprint
        self.path = ckpt.resolve_checkpoint(spec.path)
        self.dir = Path(cfg.out_dir) / "units" / spec.name
        self.stamp = stamp({"checkpoint": str(self.path.resolve()),
                            "iteration": ckpt.read_run(self.path)["progress"]["iteration"],
                            "run": run_stamp(spec.path) or run_stamp(self.path.parent)})
        self.loaded: Optional[tuple] = None

    def model(self):
        if self.loaded is None:
            from megatron_srp.inference.sample import load_for_inference
            self.loaded = load_for_inference(self.path)
            if self.loaded[1].fingerprint != self.fingerprint:
                raise ConfigError("data.labels", f"checkpoint {self.spec.name} ({self.path}) uses "
                                  f"tokenizer {self.loaded[1].fingerprint}, the labelled dataset "
                                  f"{self.fingerprint}: its token ids mean nothing to the model")
        return self.loaded

    def release(self) -> None:
        self.loaded = None


def _units(cfg: EvalConfig) -> list[str]:
    units = []
    if cfg.reflection.enabled:
        units += [f"reflection_{m}" for m in cfg.reflection.methods]
    if cfg.probes.enabled:
        units.append("probes")
    return units


def _unit_settings(unit: str, cfg: EvalConfig) -> dict[str, Any]:
    """The settings a unit's result depends on (besides the checkpoint and the data)."""
    if unit == "reflection_few_shot":
        return {"shots": cfg.reflection.shots}
    if unit == "reflection_probe":
        return {"seeds": cfg.probes.seeds}
    if unit == "probes":
        return asdict(cfg.probes)
    return {}


def run_evaluation(cfg: EvalConfig, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compute every missing unit, then rebuild the report; returns the results."""
    from tqdm import tqdm

    from megatron_srp.evaluation.reflection_accuracy import dataset_tokenizer, load_segments

    segments = load_segments(cfg.data.labels, cfg.data.context, cfg.data.max_segments,
                             cfg.data.seed)
    if not segments:
        raise ConfigError("data.labels", f"{cfg.data.labels}: no labelled segments with tokens")
    unsafe = sum(not s.safe for s in segments)
    log(f"{len(segments)} labelled segments ({unsafe} unsafe) from {cfg.data.labels}")
    fingerprint = dataset_tokenizer(cfg.data.labels).fingerprint
    units = _units(cfg)
    done = skipped = 0
    bar = tqdm(total=len(units) * len(cfg.checkpoints), desc="units", disable=not progress)
    store = Units(Path(cfg.out_dir) / "units")
    wanted: dict[str, str] = {}
    for spec in cfg.checkpoints:
        ck = _Checkpoint(spec, cfg, fingerprint)
        for unit in units:
            want = unit_stamp({"data": asdict(cfg.data), "unit": unit,
                               "settings": _unit_settings(unit, cfg)}, [ck.stamp],
                              METRIC_VERSION)
            wanted[f"{spec.name}/{unit}"] = want
            if store.done(f"{spec.name}/{unit}", want):
                skipped += 1
            else:
                result = _compute(unit, ck, segments, cfg, progress)
                store.put(f"{spec.name}/{unit}", want, result, checkpoint=str(ck.path),
                          unit=unit)
                done += 1
            bar.update(1)
        ck.release()
    bar.close()
    log(f"computed {done} unit(s), reused {skipped} finished before")
    from megatron_srp.evaluation.report import write_report
    return write_report(cfg, [c.name for c in cfg.checkpoints], units, wanted)


def _activations(ck: _Checkpoint, segments, cfg: EvalConfig, progress: bool
                 ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Last-token activations of the first, middle and last layers (and those layers'
    numbers), cached beside the units."""
    from megatron_srp.evaluation.probes import last_token_activations, probe_layers

    names = ("first", "middle", "last")
    acts_stamp = stamp(ck.stamp, asdict(cfg.data))
    cache = ck.dir / "activations.npz"
    if cache.exists():
        data = np.load(cache)
        if str(data["stamp"]) == acts_stamp:
            return ({k: data[k] for k in names},
                    {k: int(v) for k, v in zip(names, data["layers"])})
    model, tokenizer, run_cfg = ck.model()
    layer_of = probe_layers(run_cfg.model.shape().num_layers)
    acts = last_token_activations(model, [s.tokens for s in segments],
                                  sorted(set(layer_of.values())),
                                  batch_size=cfg.reflection.batch_size, progress=progress)
    out = {name: acts[layer_of[name]] for name in names}
    ck.dir.mkdir(parents=True, exist_ok=True)
    tmp = ck.dir / ".activations.tmp.npz"
    np.savez(tmp, stamp=np.array(acts_stamp), layers=np.array([layer_of[n] for n in names]), **out)
    os.replace(tmp, cache)
    return out, {name: layer_of[name] for name in names}


def _compute(unit: str, ck: _Checkpoint, segments, cfg: EvalConfig, progress: bool) -> dict:
    from tqdm import tqdm

    from megatron_srp.evaluation import reflection_accuracy as ra
    from megatron_srp.evaluation.probes import probe_layers_report

    if unit == "probes":
        acts, layer_of = _activations(ck, segments, cfg, progress)
        labels = np.array([0 if s.safe else 1 for s in segments])
        chosen = {name: layer_of[name] for name in cfg.probes.layers}
        return probe_layers_report({layer_of[n]: acts[n] for n in chosen}, labels, chosen,
                                   n_train_per_class=cfg.probes.n_train_per_class,
                                   seeds=cfg.probes.seeds)
    method = unit.removeprefix("reflection_")
    if method == "probe":
        acts, _ = _activations(ck, segments, cfg, progress)
        return ra.by_probe(acts["last"], segments, seeds=cfg.probes.seeds)
    model, tokenizer, _ = ck.model()
    bar = tqdm(total=len(segments), desc=f"{ck.spec.name}: {method}", disable=not progress,
               leave=False)
    try:
        if method == "reflection":
            return ra.by_reflection(model, tokenizer, segments, cfg.reflection.batch_size, bar)
        shots, rest = ra.pick_shots(segments, cfg.reflection.shots, cfg.data.seed)
        bar.total = len(rest)
        return ra.by_few_shot(model, tokenizer, rest, shots, cfg.reflection.batch_size, bar)
    finally:
        bar.close()
