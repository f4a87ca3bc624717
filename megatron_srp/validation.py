"""Reject impossible runs before any process group, model or file exists.

``validate`` looks only at the config, the world size and a :class:`Platform` description,
so every rule is testable on a laptop (tests pass a pretend H100 or a pretend GPU without TE).
"""
from __future__ import annotations

import importlib.util
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_srp.config import ConfigError, ExperimentConfig
from megatron_srp.presets import CUSTOM, PRESETS

PRECISIONS = ("auto", "fp32", "bf16", "fp8")
FP8_RECIPES = ("delayed", "tensorwise")
RECOMPUTE = ("none", "selective", "full")
LAYER_SPECS = ("auto", "local", "te")


@dataclass(frozen=True)
class Platform:
    """What this machine offers. ``Platform.detect()`` reads the real one."""

    has_cuda: bool
    capability: Optional[tuple[int, int]]
    has_transformer_engine: bool

    @staticmethod
    def detect() -> "Platform":
        from megatron_srp import compat
        te = importlib.util.find_spec("transformer_engine") is not None
        return Platform(compat.has_cuda(), compat.device_capability(), te)


# What a GPU job is planned and validated for before it runs (the memory estimator, the
# NeMo-Run launcher): a Hopper GPU with Transformer Engine, as in the NGC container.
HOPPER_WITH_TE = Platform(has_cuda=True, capability=(9, 0), has_transformer_engine=True)


def resolved_precision(cfg: ExperimentConfig, platform: Platform) -> str:
    """``auto`` means bf16 on a GPU and fp32 on the CPU."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if platform.has_cuda else "fp32"


def data_parallel_size(cfg: ExperimentConfig, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_model_parallel_size
                          * cfg.parallel.pipeline_model_parallel_size)


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


def validate(cfg: ExperimentConfig, world_size: int, platform: Platform,
             check_files: bool = True, require_data: bool = True) -> None:
    """Raise :class:`ConfigError` for the first rule the config breaks."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    _require(m.preset in PRESETS or m.preset == CUSTOM, "model.preset",
             f"unknown preset {m.preset!r}; known: {', '.join(PRESETS)}, {CUSTOM}")
    _one_of(m.recompute, RECOMPUTE, "model.recompute")
    _one_of(m.layer_spec, LAYER_SPECS, "model.layer_spec")
    _one_of(t.precision, PRECISIONS, "train.precision")
    _one_of(t.fp8_recipe, FP8_RECIPES, "train.fp8_recipe")
    try:
        shape = m.shape()
    except ValueError as exc:
        raise ConfigError("model.preset", str(exc)) from exc
    _require(shape.rope_scaling_factor is None or shape.rope_scaling_factor >= 1.0,
             "model.rope_scaling_factor", f"must be >= 1 (or null: off), got "
                                          f"{shape.rope_scaling_factor}")
    tp, pp, vpp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                   p.virtual_pipeline_model_parallel_size)

    for key, value in (("parallel.tensor_model_parallel_size", tp),
                       ("parallel.pipeline_model_parallel_size", pp),
                       ("train.micro_batch_size", t.micro_batch_size),
                       ("train.global_batch_size", t.global_batch_size),
                       ("train.seq_length", t.seq_length),
                       ("train.train_iters", t.train_iters),
                       ("logging.log_interval", cfg.logging.log_interval),
                       *((f"model.{k}", getattr(shape, k)) for k in (
                           "num_layers", "hidden_size", "ffn_hidden_size",
                           "num_attention_heads", "num_query_groups"))):
        _require(value >= 1, key, f"must be >= 1, got {value}")

    _require(shape.hidden_size % shape.num_attention_heads == 0, "model.hidden_size",
             f"{shape.hidden_size} is not divisible by num_attention_heads "
             f"{shape.num_attention_heads}")
    _require(shape.num_attention_heads % shape.num_query_groups == 0, "model.num_query_groups",
             f"num_attention_heads {shape.num_attention_heads} is not divisible by "
             f"num_query_groups {shape.num_query_groups}")
    _require(shape.num_attention_heads % tp == 0, "parallel.tensor_model_parallel_size",
             f"num_attention_heads {shape.num_attention_heads} is not divisible by TP={tp}")
    _require(shape.num_query_groups % tp == 0, "parallel.tensor_model_parallel_size",
             f"num_query_groups {shape.num_query_groups} is not divisible by TP={tp}")
    _require(shape.ffn_hidden_size % tp == 0, "parallel.tensor_model_parallel_size",
             f"ffn_hidden_size {shape.ffn_hidden_size} is not divisible by TP={tp}")

    if vpp is not None:
        _require(vpp >= 1, "parallel.virtual_pipeline_model_parallel_size", "must be >= 1")
        _require(pp > 1, "parallel.virtual_pipeline_model_parallel_size",
                 "virtual pipeline stages need pipeline_model_parallel_size > 1")
    stages = pp * (vpp or 1)
    _require(shape.num_layers % stages == 0, "model.num_layers",
             f"{shape.num_layers} layers do not split into PP={pp} x virtual stages={vpp or 1}")

    _require(p.sequence_parallel is False or tp > 1, "parallel.sequence_parallel",
             "sequence parallelism needs tensor_model_parallel_size > 1")
    if p.sequence_parallel:
        _require(t.seq_length % tp == 0, "train.seq_length",
                 f"{t.seq_length} is not divisible by TP={tp} (sequence parallel)")

    _require(world_size % (tp * pp) == 0, "parallel",
             f"world size {world_size} is not divisible by TP x PP = {tp * pp}")
    dp = data_parallel_size(cfg, world_size)
    _require(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
             f"{t.global_batch_size} is not divisible by micro_batch_size x DP = "
             f"{t.micro_batch_size} x {dp}")
    if vpp is not None and vpp > 1:
        n_micro = t.global_batch_size // (t.micro_batch_size * dp)
        _require(n_micro % pp == 0, "train.global_batch_size",
                 f"interleaved pipelining needs the number of microbatches ({n_micro}) "
                 f"to be a multiple of PP={pp}")

    _require(t.seq_length <= shape.max_position_embeddings, "train.seq_length",
             f"{t.seq_length} exceeds the preset's max_position_embeddings "
             f"{shape.max_position_embeddings}")
    _require(0 <= t.min_lr <= t.lr, "train.min_lr", f"must be in [0, lr={t.lr}], got {t.min_lr}")
    decay = t.lr_decay_iters or t.train_iters
    _require(0 <= t.warmup_iters < decay, "train.warmup_iters",
             f"must be >= 0 and below the decay length ({decay} iterations), got {t.warmup_iters}")

    try:
        signal_numbers(t.exit_signals)
    except ValueError as exc:
        raise ConfigError("train.exit_signals", str(exc).split(": ", 1)[1]) from None
    _require(t.exit_duration_minutes is None or t.exit_duration_minutes > 0,
             "train.exit_duration_minutes", f"must be > 0 (or null), got {t.exit_duration_minutes}")

    precision = resolved_precision(cfg, platform)
    if precision in ("bf16", "fp8"):
        _require(platform.has_cuda, "train.precision",
                 f"{precision} needs a CUDA GPU; on CPU use fp32 (or auto)")
    if precision == "fp8":
        _require(platform.has_transformer_engine, "train.precision",
                 "fp8 needs Transformer Engine (pip install 'megatron-srp[gpu]' or an NGC "
                 "PyTorch container); it is not importable here")
        _require(platform.capability is not None and platform.capability >= (9, 0),
                 "train.precision",
                 f"fp8 needs a Hopper (sm_90) or newer GPU; this one is sm_"
                 f"{''.join(map(str, platform.capability or (0, 0)))}")
    if m.layer_spec == "te":
        _require(platform.has_transformer_engine and platform.has_cuda, "model.layer_spec",
                 "'te' needs Transformer Engine and a CUDA GPU")

    if require_data:
        _check_data(cfg, check_files)
    _check_checkpoint(cfg, check_files)


def _check_data(cfg: ExperimentConfig, check_files: bool) -> None:
    from megatron_srp.data.curriculum_plan import plan_phases

    d = cfg.data
    if d.weights is not None and not d.curriculum:
        _require(len(d.weights) == len(d.paths), "data.weights",
                 f"{len(d.weights)} weights for {len(d.paths)} paths")
    plan_phases(d, cfg.train.train_iters * cfg.train.global_batch_size)
    _require(d.blend_window >= 1, "data.blend_window", "must be >= 1")
    parts = d.split.split(",")
    ok = len(parts) == 3 and all(x.strip().replace(".", "", 1).isdigit() for x in parts)
    _require(ok, "data.split", f"{d.split!r} is not three comma-separated numbers like '95,5,0'")
    _require(sum(float(x) for x in parts) > 0, "data.split", "the split sums to zero")
    if check_files:
        _check_dataset_files(cfg)


def _check_dataset_files(cfg: ExperimentConfig) -> None:
    """Every dataset exists, and all were built with one tokenizer (their meta.json) and, where
    a dataset records one, for the run's sequence length."""
    from megatron_srp.data.outputs import read_dataset_meta

    d = cfg.data
    keys = {prefix: f"data.paths[{i}]" if not d.curriculum else f"data.curriculum (dataset {prefix})"
            for i, prefix in enumerate(d.prefixes())}
    for prefix, key in keys.items():
        for ext in (".bin", ".idx"):
            _require(Path(prefix + ext).is_file(), key,
                     f"{prefix + ext} does not exist (run tools/preprocess_srp.py first)")
    fingerprints: dict[str, str] = {}
    for prefix, key in keys.items():
        if not Path(prefix + ".meta.json").is_file():
            continue  # a foreign dataset: the trainer's tokenizer check reports it
        try:
            meta = read_dataset_meta(prefix)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(key, str(exc)) from exc
        fingerprint = (meta.get("tokenizer") or {}).get("fingerprint")
        if fingerprint is not None:
            fingerprints[prefix] = fingerprint
        seq = meta.get("seq_length")
        _require(seq is None or seq == cfg.train.seq_length, key,
                 f"{prefix} was built for sequence length {seq}, the run uses "
                 f"train.seq_length={cfg.train.seq_length}")
    if len(set(fingerprints.values())) > 1:
        first = next(iter(fingerprints.items()))
        other = next((p, f) for p, f in fingerprints.items() if f != first[1])
        raise ConfigError("data.curriculum" if d.curriculum else "data.paths",
                          f"datasets were built with different tokenizers: {first[0]} with "
                          f"{first[1]}, {other[0]} with {other[1]} (meta.json); re-run "
                          "preprocessing with one tokenizer")


def _check_checkpoint(cfg: ExperimentConfig, check_files: bool) -> None:
    ckpt = cfg.checkpoint
    _require(ckpt.save_interval >= 0, "checkpoint.save_interval", "must be >= 0")
    _require(ckpt.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _one_of(ckpt.optimizer_format, ("fully_reshardable", "dp_reshardable"),
            "checkpoint.optimizer_format")
    if ckpt.load is not None and check_files:
        _require(os.path.isdir(ckpt.load), "checkpoint.load", f"{ckpt.load} is not a directory")
    _require(ckpt.load is None or ckpt.pretrained is None, "checkpoint.pretrained",
             "set checkpoint.load (resume a run with its optimizer) or checkpoint.pretrained "
             "(start from weights), not both")
    if ckpt.pretrained is not None and check_files:
        _require(os.path.isdir(ckpt.pretrained), "checkpoint.pretrained",
                 f"{ckpt.pretrained} is not a directory")


def signal_numbers(names: Sequence[str]) -> list[signal.Signals]:
    """``["SIGTERM", "USR1"]`` -> the signals; a name a process cannot catch is a ValueError
    naming it."""
    out = []
    for name in names:
        key = str(name).upper()
        key = key if key.startswith("SIG") else "SIG" + key
        if key in ("SIGKILL", "SIGSTOP") or not isinstance(getattr(signal, key, None),
                                                          signal.Signals):
            raise ValueError(f"train.exit_signals: {name!r} is not a signal a process can catch "
                             f"(e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGINT)")
        out.append(getattr(signal, key))
    return out
