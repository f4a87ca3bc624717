"""The units that measure one stage of the attack suite, each in two halves.

**Answers** (generation, the expensive half) depend on the stage's model and the decoding
settings; **scores** depend on those answers and the judge. stages.py saves the answers before
the judge runs, so a judge that fails (an endpoint that is down) loses nothing, and a rerun, or
a change of judge, scores the stored answers without generating them again.

Units: ``asr-<benchmark>`` (ASR per decoding method), ``overrefusal`` (harmless prompts, one
method, classes of answer), ``gcg`` (suffixes optimised against the stage's model, then ASR on
those behaviours without and with the suffix).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_srp.evaluation.stage_config import AttackSuiteConfig, StageSpec


def benchmark_items(name: str, path, limit, harmful):
    from megatron_srp.evaluation.benchmarks import load_benchmark
    items = load_benchmark(name, path)
    if harmful is not None:
        items = [b for b in items if b.harmful == harmful]
    return items[:limit] if limit else items


def unit_names(cfg: AttackSuiteConfig, st: StageSpec) -> list[str]:
    """The units the config names for a stage."""
    units = [f"asr-{b.name}" for b in cfg.benchmarks if b.stages is None or st.name in b.stages]
    if cfg.overrefusal.enabled:
        units.append("overrefusal")
    if cfg.gcg.enabled and st.name in cfg.gcg.stages:
        units.append("gcg")
    return units


def _decode_settings(cfg: AttackSuiteConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ("samples", "max_new_tokens", "num_beams",
                                         "segment_tokens", "guard_fail_open")}


def _spec(cfg: AttackSuiteConfig, unit: str):
    return next(b for b in cfg.benchmarks if f"asr-{b.name}" == unit)


def answer_settings(cfg: AttackSuiteConfig, st: StageSpec, unit: str) -> dict[str, Any]:
    """What a unit's answers depend on besides the model (the batch size only groups work)."""
    from megatron_srp.evaluation.stage_config import stage_methods

    base = {"unit": unit, "template": st.template, **_decode_settings(cfg)}
    if st.window is not None:
        base["window"] = st.window
    if unit == "overrefusal":  # one deterministic pass: the sample count does not matter
        o = asdict(cfg.overrefusal)
        del o["judge"]
        return {**base, "samples": None, **o}
    if unit.startswith("asr-"):
        return {**base, "benchmark": asdict(_spec(cfg, unit)) | {"stages": None},
                "methods": stage_methods(cfg, st)}
    return {**base, "gcg": asdict(cfg.gcg) | {"stages": None}, "methods": stage_methods(cfg, st)}


def judge_settings(cfg: AttackSuiteConfig, unit: str) -> dict[str, Any]:
    """What scoring a unit's answers depends on (besides the judges' version)."""
    if unit == "overrefusal":
        return {"judge": asdict(cfg.overrefusal.judge)}
    return {"judge": asdict(cfg.judge)}


def _answers(model, tok, behaviors, cfg: AttackSuiteConfig, st: StageSpec, desc: str,
             progress: bool, suffixes=None) -> dict:
    from tqdm import tqdm

    from megatron_srp.evaluation.attacks import attack_answers
    from megatron_srp.evaluation.stage_config import stage_methods

    methods = stage_methods(cfg, st)
    rounds = sum(cfg.samples if m in ("topk", "guarded") else 1 for m in methods)
    bar = tqdm(total=rounds * len(behaviors), desc=desc, disable=not progress, leave=False)
    try:
        return attack_answers(model, tok, behaviors, methods, samples=cfg.samples,
                              max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                              num_beams=cfg.num_beams, segment_tokens=cfg.segment_tokens,
                              template=st.template, suffixes=suffixes, progress=bar.update,
                              guard_fail_open=cfg.guard_fail_open)
    finally:
        bar.close()


def generate(unit: str, model, tok, cfg: AttackSuiteConfig, st: StageSpec,
             progress: bool) -> dict:
    """A unit's answers (and GCG's suffixes), unjudged."""
    if unit.startswith("asr-"):
        spec = _spec(cfg, unit)
        behaviors = benchmark_items(spec.name, spec.path, spec.limit, None)
        return _answers(model, tok, behaviors, cfg, st, f"{st.name}: {spec.name}", progress)
    if unit == "overrefusal":
        return _overrefusal_answers(model, tok, cfg, st)
    return _gcg_answers(model, tok, cfg, st, progress)


def score(unit: str, answers: dict, cfg: AttackSuiteConfig) -> dict:
    """A unit's result from its stored answers."""
    from megatron_srp.evaluation.attacks import judge_answers
    from megatron_srp.evaluation.judges import build_judge

    if unit == "overrefusal":
        return _overrefusal_score(answers, cfg)
    judge = build_judge(cfg.judge.name, **cfg.judge.options)
    if unit.startswith("asr-"):
        spec = _spec(cfg, unit)
        return judge_answers(answers, benchmark_items(spec.name, spec.path, spec.limit, None),
                             judge)
    behaviors = benchmark_items(cfg.gcg.benchmark, None, cfg.gcg.behaviors, harmful=True)
    return {"benchmark": answers["benchmark"], "suffixes": answers["suffixes"],
            "without_suffix": judge_answers(answers["without_suffix"], behaviors, judge),
            "with_suffix": judge_answers(answers["with_suffix"], behaviors, judge)}


def _overrefusal_answers(model, tok, cfg: AttackSuiteConfig, st: StageSpec) -> dict:
    from megatron_srp.evaluation.attacks import attack_ids, decoding_config
    from megatron_srp.inference.generation import decode_ids

    o = cfg.overrefusal
    benign = benchmark_items(o.benchmark, None, o.limit, harmful=False)
    config = decoding_config(o.method, cfg.max_new_tokens, 0, cfg.num_beams, cfg.segment_tokens,
                             cfg.guard_fail_open)
    results = []
    for start in range(0, len(benign), cfg.batch_size):
        chunk = benign[start:start + cfg.batch_size]
        results += decode_ids(model, tok, [attack_ids(tok, b.prompt, st.template)
                                           for b in chunk], config)
    return {"benchmark": o.benchmark, "method": o.method,
            "answers": [{"id": b.id, "text": r.text, "short_circuited": r.short_circuited}
                        for b, r in zip(benign, results)]}


def _overrefusal_score(answers: dict, cfg: AttackSuiteConfig) -> dict:
    from megatron_srp.evaluation.overrefusal import build_overrefusal_judge, over_refusal_summary

    o = cfg.overrefusal
    benign = benchmark_items(o.benchmark, None, o.limit, harmful=False)
    rows = answers["answers"]
    if [r["id"] for r in rows] != [b.id for b in benign]:
        raise ValueError("stored over-refusal answers are for other prompts than these")
    judge = build_overrefusal_judge(o.judge.name, **o.judge.options)
    classes = judge.judge([b.prompt for b in benign], [r["text"] for r in rows],
                          [r["short_circuited"] for r in rows])
    return {**over_refusal_summary(classes), "benchmark": answers["benchmark"],
            "method": answers["method"],
            "answers": [{"id": r["id"], "text": r["text"], "class": c}
                        for r, c in zip(rows, classes)]}


def _gcg_answers(model, tok, cfg: AttackSuiteConfig, st: StageSpec, progress: bool) -> dict:
    from megatron_srp.evaluation.gcg import GCGConfig, optimize_suffix

    g = cfg.gcg
    behaviors = benchmark_items(g.benchmark, None, g.behaviors, harmful=True)
    gcfg = GCGConfig(steps=g.steps, top_k=g.top_k, search_width=g.search_width,
                     target=g.target, template=st.template)
    found = []
    for b in behaviors:
        r = optimize_suffix(model, tok, [b.prompt], gcfg, progress=progress)
        found.append({"id": b.id, "suffix": r.suffix, "suffix_ids": r.suffix_ids,
                      "initial_loss": r.initial_loss, "loss": r.loss, "steps": r.steps,
                      "success": r.success, "seconds": r.seconds, "losses": r.losses})
    plain = _answers(model, tok, behaviors, cfg, st, f"{st.name}: gcg baseline", progress)
    attacked = _answers(model, tok, behaviors, cfg, st, f"{st.name}: gcg", progress,
                        suffixes=[f["suffix_ids"] for f in found])
    return {"benchmark": g.benchmark, "suffixes": found, "without_suffix": plain,
            "with_suffix": attacked}
