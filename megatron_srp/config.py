"""Typed run configuration: dataclasses, a YAML file, ``key=value`` overrides.

Everything a run can be told lives here, with its default. ``load_config`` merges the YAML
and the overrides onto the dataclasses (omegaconf structured configs, so unknown keys and wrong
types fail), and ``validate`` rejects impossible combinations with one message that names the
key -- before any process group, model or file is created.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_srp.presets import ModelShape, resolve_shape


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}")


@dataclass
class ModelConfig:
    """A preset name plus optional overrides of its shape (``preset: custom``: no preset, every
    shape field given, as an imported Hugging Face model's config is; docs/import.md)."""

    preset: str = "tiny"
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    rotary_base: Optional[float] = None
    tie_embeddings: Optional[bool] = None
    init_method_std: Optional[float] = None
    norm_epsilon: Optional[float] = None
    rope_scaling_factor: Optional[float] = None  # Llama 3.x RoPE scaling; None: off
    vocab_size: Optional[int] = None  # reference only: a run uses its tokenizer's size
    max_position_embeddings: Optional[int] = None  # reference only: see train.seq_length
    # "auto": Transformer Engine on a GPU when importable, else local modules + torch SDPA.
    layer_spec: str = "auto"
    recompute: str = "none"  # none | selective | full

    def shape(self) -> ModelShape:
        overrides = {k: getattr(self, k) for k in (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "num_query_groups", "rotary_base", "tie_embeddings", "init_method_std",
            "norm_epsilon", "rope_scaling_factor", "vocab_size", "max_position_embeddings")}
        return resolve_shape(self.preset, **overrides)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    # None: overlap gradient reduction with backward on GPU, not on CPU.
    overlap_grad_reduce: Optional[bool] = None


@dataclass
class TrainConfig:
    seed: int = 1234
    train_iters: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_length: int = 256
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp8
    fp8_recipe: str = "delayed"  # delayed | tensorwise (current scaling)
    fp8_first_last_bf16: bool = False
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_iters: int = 10
    lr_decay_iters: Optional[int] = None  # defaults to train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    eval_interval: int = 50
    eval_iters: int = 4
    # Stop at the next step boundary with a checkpoint (exit 75) on these signals, or when the
    # next regular save would come after exit_duration_minutes (docs/deployment.md).
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    exit_duration_minutes: Optional[float] = None


@dataclass
class PhaseConfig:
    """One curriculum phase: the ``blend`` ({dataset prefix: weight}) used for the training
    samples up to ``until`` (a fraction of the train token budget; the last phase ends at 1.0)."""

    until: float = 1.0
    blend: dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Megatron indexed datasets (``<prefix>.bin/.idx``) and how to mix and split them.

    Either one blend for the whole run (``paths`` + ``weights``) or a ``curriculum`` of phases
    whose blends switch at chosen fractions of the token budget (docs/curriculum.md).
    """

    paths: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None
    curriculum: list[PhaseConfig] = field(default_factory=list)
    # {prefix: fraction of the train budget}: that dataset contributes exactly this many
    # tokens over the run, wherever the curriculum places it (fair curriculum comparisons).
    match_tokens: dict[str, float] = field(default_factory=dict)
    blend_window: int = 1000  # samples over which the drawn blend is reported
    split: str = "95,5,0"
    tokenizer: Optional[str] = None  # default: the tokenizer saved beside the first dataset
    cache_dir: Optional[str] = None  # Megatron's sample-index cache; default <save>/data_cache

    def prefixes(self) -> list[str]:
        """Every dataset the run reads, in order of first appearance."""
        if not self.curriculum:
            return list(self.paths)
        return list(dict.fromkeys(p for phase in self.curriculum for p in phase.blend))


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    save_interval: int = 0  # 0: only at the end
    load: Optional[str] = None  # default: resume from `save` when it holds a checkpoint
    # Continued pretraining: start from these weights (a run directory or iter_N, e.g. an
    # import) with a fresh optimizer and an LR schedule that warms up again; the model shape is
    # inherited from it. A run that already saved resumes its own checkpoints instead.
    pretrained: Optional[str] = None
    keep_last: int = 2
    # fully_reshardable: loads into any TP/PP/DP layout (gathers optimizer state on DP rank 0).
    # dp_reshardable: faster, fully parallel save; only the DP size may change on resume.
    optimizer_format: str = "fully_reshardable"


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None  # default <save>/tensorboard
    wandb_project: Optional[str] = None
    progress_bar: bool = True


@dataclass
class FinetuneConfig:
    """Supervised finetuning (tools/finetune_srp.py, docs/finetuning.md): chat JSONL with the
    loss on the answers, from a pretrained checkpoint's weights with a fresh optimizer and LR
    schedule. ``train.train_iters``, ``train.warmup_iters`` and ``train.lr_decay_iters`` are
    derived from ``epochs`` and ``warmup_fraction``."""

    pretrained: Optional[str] = None  # run directory or iter_N checkpoint: weights only
    data: list[str] = field(default_factory=list)  # chat JSONL files (data/chat.py)
    prompt_key: str = "prompt"  # for {prompt, response} records, e.g. question / answer
    response_key: str = "response"
    max_records: Optional[int] = None  # the first N records of the files (e.g. N attack pairs)
    valid_records: int = 0  # held out (after a seeded shuffle) for a validation loss
    epochs: float = 1.0
    warmup_fraction: float = 0.03
    # what the loss covers: "answer" (text and closing token), "reflection" (each answer's
    # reflections and the closing token after one), or "both" (data/chat.py)
    loss_on: str = "both"


@dataclass
class ExperimentConfig:
    name: str = "srp"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def _key_of(exc: OmegaConfBaseException) -> str:
    full_key = getattr(exc, "full_key", None)
    return str(full_key) if full_key else "?"


def _file_layers(path: Path, seen: tuple[Path, ...]) -> list[Any]:
    """The YAML at ``path``, preceded by the file its ``base:`` key names (relative to it), so
    a recipe states only what differs from its base."""
    if not path.is_file():
        raise ConfigError("--config" if not seen else f"{seen[-1]}: base", f"no such file: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{seen[-1]}: base", f"{path} is its own base (a cycle)")
    try:
        layer = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers; keep them
        raise ConfigError("--config", f"cannot parse {path}: {exc}") from exc
    base = layer.pop("base", None) if hasattr(layer, "pop") else None
    if base is None:
        return [layer]
    return [*_file_layers(path.parent / str(base), (*seen, path.resolve())), layer]


def load_config(path: str | os.PathLike | None = None,
                overrides: list[str] | None = None,
                inherited: Optional[dict[str, Any]] = None) -> ExperimentConfig:
    """Merge a YAML file (and the chain of ``base:`` files it names) and ``key=value``
    overrides onto the defaults; types are checked. ``inherited`` sits between the defaults
    and the file (finetuning inherits the pretrained run's model this way)."""
    schema = OmegaConf.structured(ExperimentConfig)
    layers = [schema]
    if inherited:
        layers.append(OmegaConf.create(inherited))
    if path is not None:
        layers += _file_layers(Path(path), ())
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value")
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(_key_of(exc), msg) from exc
    except TypeError as exc:  # e.g. "a.0.b=..." into a list: omegaconf cannot merge it
        raise ConfigError("overrides", f"{exc} in {list(overrides or [])}; a list is set "
                          "whole, e.g. data.curriculum=[{until: 1.0, blend: {prefix: 1.0}}]"
                          ) from exc
    assert isinstance(cfg, ExperimentConfig)
    return cfg


def load_yaml_config(schema: type, path: str | os.PathLike,
                     overrides: Optional[list[str]] = None) -> Any:
    """A YAML file and ``key=value`` overrides merged onto the dataclass ``schema`` (the
    evaluation and attack suites' configs); unknown keys and wrong types name the key."""
    if not Path(path).is_file():
        raise ConfigError("--config", f"no such file: {path}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides or [])))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_key_of(exc) if _key_of(exc) != "?" else "config",
                          f"{path}: {str(exc).splitlines()[0]}") from exc


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: ExperimentConfig) -> str:
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
