"""The attack-suite pipeline: models at each stage, evaluated the same way, in one command.

    python tools/attack_srp.py --config examples/attack/stages.yaml

A config lists **stages**: the first names an existing checkpoint (the pretrained base); each
later one finetunes an earlier stage (tools/finetune_srp.py, run as a torchrun job) with a
recipe and chat data -- instruction tuning, the benign GSM8K finetune, the harmful attack.
Every stage is then measured by **units**: ASR per benchmark and decoding method, over-refusal
on benign prompts, and GCG (suffixes optimised against that stage's model, then evaluated with
every decoding method beside the same behaviours without a suffix).

Resumable at every level: a finetune resumes from its own checkpoints and is skipped once it
has finished; each unit is written atomically to ``<out_dir>/units/<stage>/<unit>.json``,
stamped with the checkpoint and the settings it depends on, and skipped on a rerun when its
stamp still matches. The report (stage_report.py) is rebuilt from the units every time.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

from megatron_srp.config import ConfigError, load_yaml_config
from megatron_srp.evaluation.attacks import METHODS, TEMPLATES
from megatron_srp.evaluation.suite import stamp, write_atomic


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
    template: str = "chat"               # how this stage is asked: plain | chat


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
    overrefusal: OverRefusalSpec = field(default_factory=OverRefusalSpec)
    gcg: GCGSpec = field(default_factory=GCGSpec)


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


def stage_model(cfg: AttackSuiteConfig, st: StageSpec, paths: dict[str, Path],
                log: Callable[[str], None]) -> Path:
    """The run directory of a stage's model; a finetune stage is trained (or resumed) here."""
    if st.checkpoint is not None:
        return Path(st.checkpoint)
    from megatron_srp.data.chat_sources import write_chat_source
    from megatron_srp.evaluation.benchmarks import SHARED
    from megatron_srp.training.checkpoint import run_finished
    from megatron_srp.training.launch import FINETUNE, run_job

    f = st.finetune
    assert f is not None
    run_dir = Path(cfg.out_dir) / "models" / st.name
    if run_finished(run_dir):
        log(f"stage {st.name}: finetune finished before, reusing {run_dir}")
        return run_dir
    data = list(f.data)
    if f.source:
        out = Path(cfg.out_dir) / "data" / f"{st.name}.jsonl"
        if not out.exists():
            n = write_chat_source(f.source, SHARED, out, f.limit)
            log(f"stage {st.name}: {n} {f.source} records -> {out}")
        data = [str(out)]
    log(f"stage {st.name}: finetuning {f.start} with {f.recipe} on {', '.join(data)}")
    args = ["--config", f.recipe, f"finetune.pretrained={paths[f.start]}",
            f"finetune.data=[{','.join(data)}]", f"checkpoint.save={run_dir}",
            "logging.progress_bar=false", f"name={st.name}", *f.overrides]
    run_job(f.nproc, args, run_dir, Path(cfg.out_dir) / "logs" / f"finetune-{st.name}.log",
            script=FINETUNE, what=f"stage {st.name}: the finetune")
    return run_dir


# --------------------------------------------------------------------------------------------
# Units


def _benchmark(name: str, path: Optional[str], limit: Optional[int], harmful: Optional[bool]):
    from megatron_srp.evaluation.benchmarks import load_benchmark
    items = load_benchmark(name, path)
    if harmful is not None:
        items = [b for b in items if b.harmful == harmful]
    return items[:limit] if limit else items


def _units(cfg: AttackSuiteConfig, st: StageSpec) -> list[str]:
    units = [f"asr-{b.name}" for b in cfg.benchmarks if b.stages is None or st.name in b.stages]
    if cfg.overrefusal.enabled:
        units.append("overrefusal")
    if cfg.gcg.enabled and st.name in cfg.gcg.stages:
        units.append("gcg")
    return units


def _decode_settings(cfg: AttackSuiteConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ("samples", "max_new_tokens", "num_beams",
                                         "segment_tokens")}


def _settings(cfg: AttackSuiteConfig, st: StageSpec, unit: str) -> dict[str, Any]:
    """What a unit's result depends on besides the checkpoint: a change recomputes it."""
    base = {"template": st.template, **_decode_settings(cfg)}
    if unit == "overrefusal":  # one deterministic pass: the sample count does not matter
        return {**base, "samples": None, **asdict(cfg.overrefusal)}
    if unit.startswith("asr-"):
        spec = next(b for b in cfg.benchmarks if f"asr-{b.name}" == unit)
        return {**base, "benchmark": asdict(spec) | {"stages": None}, "methods": cfg.methods,
                "judge": asdict(cfg.judge)}
    return {**base, "gcg": asdict(cfg.gcg) | {"stages": None}, "methods": cfg.methods,
            "judge": asdict(cfg.judge)}


def _asr(model, tok, behaviors, cfg: AttackSuiteConfig, st: StageSpec, judge, desc: str,
         progress: bool, suffixes=None) -> dict:
    from tqdm import tqdm

    from megatron_srp.evaluation.attacks import attack_eval

    rounds = sum(cfg.samples if m in ("topk", "guarded") else 1 for m in cfg.methods)
    bar = tqdm(total=rounds * len(behaviors), desc=desc, disable=not progress, leave=False)
    try:
        return attack_eval(model, tok, behaviors, cfg.methods, judge, samples=cfg.samples,
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                           num_beams=cfg.num_beams, segment_tokens=cfg.segment_tokens,
                           template=st.template, suffixes=suffixes, progress=bar.update)
    finally:
        bar.close()


def compute_unit(unit: str, model, tok, cfg: AttackSuiteConfig, st: StageSpec,
                 progress: bool) -> dict:
    from megatron_srp.evaluation.judges import build_judge

    judge = build_judge(cfg.judge.name, **cfg.judge.options)
    if unit.startswith("asr-"):
        spec = next(b for b in cfg.benchmarks if f"asr-{b.name}" == unit)
        behaviors = _benchmark(spec.name, spec.path, spec.limit, None)
        return _asr(model, tok, behaviors, cfg, st, judge, f"{st.name}: {spec.name}", progress)
    if unit == "overrefusal":
        return _overrefusal(model, tok, cfg, st)
    return _gcg(model, tok, cfg, st, judge, progress)


def _overrefusal(model, tok, cfg: AttackSuiteConfig, st: StageSpec) -> dict:
    from megatron_srp.evaluation.attacks import attack_ids, decoding_config
    from megatron_srp.evaluation.overrefusal import build_overrefusal_judge, over_refusal_summary
    from megatron_srp.inference.generation import decode_ids

    o = cfg.overrefusal
    benign = _benchmark(o.benchmark, None, o.limit, harmful=False)
    config = decoding_config(o.method, cfg.max_new_tokens, 0, cfg.num_beams, cfg.segment_tokens)
    results = []
    for start in range(0, len(benign), cfg.batch_size):
        chunk = benign[start:start + cfg.batch_size]
        results += decode_ids(model, tok, [attack_ids(tok, b.prompt, st.template)
                                           for b in chunk], config)
    judge = build_overrefusal_judge(o.judge.name, **o.judge.options)
    classes = judge.judge([b.prompt for b in benign], [r.text for r in results],
                          [r.short_circuited for r in results])
    return {**over_refusal_summary(classes), "benchmark": o.benchmark, "method": o.method,
            "answers": [{"id": b.id, "text": r.text, "class": c}
                        for b, r, c in zip(benign, results, classes)]}


def _gcg(model, tok, cfg: AttackSuiteConfig, st: StageSpec, judge, progress: bool) -> dict:
    from megatron_srp.evaluation.gcg import GCGConfig, optimize_suffix

    g = cfg.gcg
    behaviors = _benchmark(g.benchmark, None, g.behaviors, harmful=True)
    gcfg = GCGConfig(steps=g.steps, top_k=g.top_k, search_width=g.search_width,
                     target=g.target, template=st.template)
    found = []
    for b in behaviors:
        r = optimize_suffix(model, tok, [b.prompt], gcfg, progress=progress)
        found.append({"id": b.id, "suffix": r.suffix, "suffix_ids": r.suffix_ids,
                      "initial_loss": r.initial_loss, "loss": r.loss, "steps": r.steps,
                      "success": r.success, "seconds": r.seconds, "losses": r.losses})
    plain = _asr(model, tok, behaviors, cfg, st, judge, f"{st.name}: gcg baseline", progress)
    attacked = _asr(model, tok, behaviors, cfg, st, judge, f"{st.name}: gcg", progress,
                    suffixes=[f["suffix_ids"] for f in found])
    return {"benchmark": g.benchmark, "suffixes": found, "without_suffix": plain,
            "with_suffix": attacked}


def run_suite(cfg: AttackSuiteConfig, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train what is missing, compute what is missing, rebuild the report; returns results."""
    from megatron_srp.evaluation.stage_report import write_stage_report
    from megatron_srp.inference.sample import load_for_inference, shutdown
    from megatron_srp.training import checkpoint as ckpt

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    paths: dict[str, Path] = {}
    done = reused = 0
    for st in cfg.stages:
        paths[st.name] = stage_model(cfg, st, paths, log)
        path = ckpt.resolve_checkpoint(paths[st.name])
        iteration = ckpt.read_run(path)["progress"]["iteration"]
        loaded = None
        for unit in _units(cfg, st):
            unit_stamp = stamp(str(path.resolve()), iteration, unit, _settings(cfg, st, unit))
            file = out / "units" / st.name / f"{unit}.json"
            if file.exists() and json.loads(file.read_text()).get("stamp") == unit_stamp:
                reused += 1
                continue
            if loaded is None:
                loaded = load_for_inference(path)
            log(f"stage {st.name}: {unit}")
            result = compute_unit(unit, loaded[0], loaded[1], cfg, st, progress)
            write_atomic(file, {"stamp": unit_stamp, "checkpoint": str(path), "stage": st.name,
                                "unit": unit, "result": result})
            done += 1
        loaded = None
    shutdown()
    log(f"computed {done} unit(s), reused {reused} finished before")
    return write_stage_report(cfg)
