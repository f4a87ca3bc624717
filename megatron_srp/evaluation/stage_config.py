"""The attack suite's configuration: stages, benchmarks, the judge, over-refusal and GCG, as
typed dataclasses, loaded from YAML and checked before any work starts (stages.py runs it)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_srp.config import ConfigError, load_yaml_config
from megatron_srp.evaluation.attacks import METHODS, TEMPLATES


@dataclass
class FinetuneStep:
    recipe: str = "???"                  # examples/finetune/*.yaml
    start: str = "???"                   # the earlier stage whose model it starts from
    data: list[str] = field(default_factory=list)  # chat JSONL files ...
    source: Optional[str] = None         # ... or a data/chat_sources.py set, written once
    limit: Optional[int] = None          # sample of the source's records
    overrides: list[str] = field(default_factory=list)  # key=value for the finetune run
    nproc: int = 1                       # torchrun processes


@dataclass
class StageSpec:
    name: str = "???"
    checkpoint: Optional[str] = None     # an existing run (the pretrained base) ...
    finetune: Optional[FinetuneStep] = None  # ... or a finetune of an earlier stage
    template: str = "chat"               # how this stage is asked: plain | chat | model
    methods: Optional[list[str]] = None  # decoding methods for this stage (default: methods)
    window: Optional[int] = None         # context window to decode with (default: the run's
    #                                      train.seq_length); e.g. a finetune trained on short
    #                                      samples of a long-context model, asked at full length


@dataclass
class BenchmarkSpec:
    name: str = "???"                    # evaluation/benchmarks.py
    path: Optional[str] = None           # default: its file in the shared data
    limit: Optional[int] = None          # the first N behaviours
    stages: Optional[list[str]] = None   # default: every stage


@dataclass
class JudgeSpec:
    name: str = "refusal-keywords"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OverRefusalSpec:
    enabled: bool = True
    benchmark: str = "xstest"            # its harmless prompts are used
    limit: Optional[int] = 100
    method: str = "greedy"
    judge: JudgeSpec = field(default_factory=lambda: JudgeSpec(name="heuristic"))


@dataclass
class GCGSpec:
    enabled: bool = False
    stages: list[str] = field(default_factory=list)
    benchmark: str = "advbench"
    behaviors: int = 5                   # the first N behaviours, one suffix each
    steps: int = 500
    top_k: int = 256
    search_width: int = 512
    target: str = "Sure"


@dataclass
class AttackSuiteConfig:
    name: str = "attack-stages"
    out_dir: str = "???"
    stages: list[StageSpec] = field(default_factory=list)
    benchmarks: list[BenchmarkSpec] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["topk", "safebeam", "guarded"])
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    samples: int = 5                     # per prompt, for the sampling methods
    max_new_tokens: int = 256
    batch_size: int = 16
    num_beams: int = 10
    segment_tokens: int = 256            # guarded decoding's reflection interval
    guard_fail_open: bool = False        # guarded: a malformed reflection lets the answer pass
    overrefusal: OverRefusalSpec = field(default_factory=OverRefusalSpec)
    gcg: GCGSpec = field(default_factory=GCGSpec)


def stage_methods(cfg: AttackSuiteConfig, st: StageSpec) -> list[str]:
    """The decoding methods a stage is measured with: its own list, else the suite's."""
    return list(st.methods) if st.methods is not None else list(cfg.methods)


def load_suite_config(path: str | os.PathLike, overrides: Optional[list[str]] = None
                      ) -> AttackSuiteConfig:
    cfg = load_yaml_config(AttackSuiteConfig, path, overrides)
    assert isinstance(cfg, AttackSuiteConfig)
    validate_suite(cfg)
    return cfg


def validate_suite(cfg: AttackSuiteConfig) -> None:
    from megatron_srp.data.chat_sources import SOURCES
    from megatron_srp.evaluation.benchmarks import BENCHMARKS

    if not cfg.stages:
        raise ConfigError("stages", "list at least one stage")
    seen: list[str] = []
    for i, st in enumerate(cfg.stages):
        key = f"stages[{i}]"
        if not st.name or "/" in st.name or st.name in seen:
            raise ConfigError(f"{key}.name", f"{st.name!r} is empty, has a '/', or is repeated")
        if (st.checkpoint is None) == (st.finetune is None):
            raise ConfigError(key, "give exactly one of checkpoint (an existing run) and "
                                   "finetune (a finetune of an earlier stage)")
        if st.template not in TEMPLATES:
            raise ConfigError(f"{key}.template", f"choose from {', '.join(TEMPLATES)}")
        if st.methods is not None:
            bad = sorted(set(st.methods) - set(METHODS))
            if bad or not st.methods:
                raise ConfigError(f"{key}.methods", f"unknown {bad}; choose from "
                                                    f"{', '.join(METHODS)}")
        if st.window is not None and st.window <= cfg.max_new_tokens:
            raise ConfigError(f"{key}.window", f"must exceed max_new_tokens "
                                               f"({cfg.max_new_tokens}), got {st.window}")
        f = st.finetune
        if f is not None:
            if f.start not in seen:
                raise ConfigError(f"{key}.finetune.start", f"{f.start!r} is not an earlier "
                                                           f"stage (earlier: {seen})")
            if not Path(f.recipe).is_file():
                raise ConfigError(f"{key}.finetune.recipe", f"no such file: {f.recipe}")
            if bool(f.data) == bool(f.source):
                raise ConfigError(f"{key}.finetune", "give exactly one of data and source")
            if f.source and f.source not in SOURCES:
                raise ConfigError(f"{key}.finetune.source", f"unknown {f.source!r}; choose "
                                                            f"from {', '.join(SOURCES)}")
        seen.append(st.name)
    for i, b in enumerate(cfg.benchmarks):
        if b.name not in BENCHMARKS:
            raise ConfigError(f"benchmarks[{i}].name", f"unknown {b.name!r}; choose from "
                                                       f"{', '.join(BENCHMARKS)}")
        for s in b.stages or []:
            if s not in seen:
                raise ConfigError(f"benchmarks[{i}].stages", f"no stage {s!r}")
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown or not cfg.methods:
        raise ConfigError("methods", f"unknown {unknown}; choose from {', '.join(METHODS)}")
    if cfg.overrefusal.method not in METHODS:
        raise ConfigError("overrefusal.method", f"choose from {', '.join(METHODS)}")
    for s in cfg.gcg.stages:
        if s not in seen:
            raise ConfigError("gcg.stages", f"no stage {s!r}")
    for key in ("samples", "max_new_tokens", "batch_size", "num_beams"):
        if getattr(cfg, key) < 1:
            raise ConfigError(key, f"must be >= 1, got {getattr(cfg, key)}")


# --------------------------------------------------------------------------------------------
# Models of the stages
