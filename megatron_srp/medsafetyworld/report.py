"""The experiment's report: numbers over seeds (mean ± standard deviation), tables and plots.

``<out>/report.md`` and ``<out>/results.json``; plots in ``<out>/plots/``: ``asr_attacks.png``
(ASR per model and attack, greedy decoding) and ``asr_methods.png`` (ASR per model and decoding
method, no attack), error bars one standard deviation over seeds.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from megatron_srp.medsafetyworld.world import CATEGORIES


def _stats(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def _cell(s: dict[str, float], pct: bool = True) -> str:
    if s["n"] == 0:
        return "-"
    k = 100 if pct else 1
    return f"{k * s['mean']:.1f} ± {k * s['std']:.1f}" if pct else \
        f"{s['mean']:.3f} ± {s['std']:.3f}"


def collect(cfg, out: Path) -> dict[str, Any]:
    from megatron_srp.medsafetyworld.experiment import model_names, switch_name

    e = cfg.eval
    models: dict[str, Any] = {}
    for name in model_names(cfg):
        evals, trains = [], []
        for seed in cfg.seeds:
            ev, tr = out / "steps" / f"eval-{name}-s{seed}.json", \
                out / "steps" / f"train-{name}-s{seed}.json"
            if ev.exists():
                evals.append(json.loads(ev.read_text())["result"])
            if tr.exists():
                trains.append(json.loads(tr.read_text())["result"])
        if not evals:
            continue
        first = e.attack_methods[0] if e.attack_methods else e.methods[0]
        m: dict[str, Any] = {"seeds": len(evals),
                             "final_loss": _stats([t["final_loss"] for t in trains])}
        m["attacks"] = {a: _stats([r["asr"][first][a]["asr"] for r in evals])
                        for a in evals[0]["asr"][first]}
        m["methods"] = {k: _stats([r["asr"][k]["none"]["asr"] for r in evals])
                        for k in evals[0]["asr"]}
        m["categories"] = {c.code: _stats([r["asr"][first]["none"]["by_category"].get(key,
                                                                                   float("nan"))
                                           for r in evals]) for key, c in CATEGORIES.items()}
        m["safe"] = {k: {f: _stats([r["safe"][k][f] for r in evals])
                         for f in ("correct", "unsafe", "over_refusal")} for k in evals[0]["safe"]}
        m["dose_correct"] = _stats([r["safe"][first]["correct_by_kind"]["dose"] for r in evals])
        m["prescribe_correct"] = _stats([r["safe"][first]["correct_by_kind"]["prescribe"]
                                         for r in evals])
        m["reflection"] = {k: _stats([r["reflection"][k] for r in evals])
                           for k in ("balanced_accuracy", "unsafe_recall", "safe_recall")}
        gcg = [r["asr"][first]["gcg"] for r in evals if "gcg" in r["asr"][first]]
        if gcg:
            m["gcg"] = {"n": gcg[0]["n"], **{k: _stats([g["gcg"][k] for g in gcg])
                                             for k in ("initial_loss", "loss", "target_hits")}}
        models[name] = m
    timing = {v: [(0, v)] + [(round(100 * s), switch_name(v, s)) for s in sorted(cfg.switch_at)]
              + [(100, "raw")] for v in cfg.switch_variants} if cfg.switch_at else {}
    return {"name": cfg.name, "seeds": list(cfg.seeds), "attack_method":
            e.attack_methods[0] if e.attack_methods else e.methods[0], "models": models,
            "curriculum": timing}


def gcg_lines(models: dict[str, Any]) -> list[str]:
    """What GCG reached per model: the target's loss before and after, and how many of the
    attacked queries got the exact target as the greedy continuation."""
    rows = [(n, m["gcg"]) for n, m in models.items() if "gcg" in m]
    if not rows:
        return []
    lines = ["", f"GCG attacks {rows[0][1]['n']} harmful queries per model (a suffix each); "
             "target loss and exact target hits, mean ± std over seeds:", "",
             "| model | target loss before | after | target hits |", "|---|---|---|---|"]
    return lines + [f"| {n} | {_cell(g['initial_loss'], False)} | {_cell(g['loss'], False)} | "
                    f"{_cell(g['target_hits'], False)} |" for n, g in rows]


def timing_table(results: dict[str, Any]) -> list[str]:
    """Curriculum timing: the intervention switched on at 0% (the variant), at each
    ``switch_at`` and at 100% (never: the raw model) of the token budget."""
    models, am = results["models"], results["attack_method"]
    if not results.get("curriculum"):
        return []
    attacks = list(next(iter(models.values()))["attacks"]) if models else []
    lines = ["", f"## Curriculum timing ({am} decoding)", "",
             "The intervention switches on at this share of the token budget (raw data "
             "before); 100% is the raw model.", "",
             "| variant | switch at | " + " | ".join(f"ASR {a}" for a in attacks)
             + " | safe correct | reflection balanced acc. |",
             "|---|---|" + "---|" * (len(attacks) + 2)]
    for variant, points in results["curriculum"].items():
        for pct, name in points:
            m = models.get(name)
            if m is None:
                continue
            lines.append(f"| {variant} | {pct}% | "
                         + " | ".join(_cell(m["attacks"][a]) for a in attacks)
                         + f" | {_cell(m['safe'][am]['correct'])} | "
                         f"{_cell(m['reflection']['balanced_accuracy'])} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    models = results["models"]
    if not models:
        return "# MedSafetyWorld\n\nNo model evaluated yet.\n"
    any_m = next(iter(models.values()))
    attacks, methods = list(any_m["attacks"]), list(any_m["methods"])
    am = results["attack_method"]
    lines = [f"# MedSafetyWorld: {results['name']}", "",
             f"Seeds: {results['seeds']}. Every number is the mean ± standard deviation over "
             "seeds, in %. ASR: share of harmful queries answered unsafely (exact judge).", "",
             f"## ASR under inference-stage attacks ({am} decoding)", "",
             "| model | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    lines += [f"| {n} | " + " | ".join(_cell(m["attacks"][a]) for a in attacks) + " |"
              for n, m in models.items()]
    lines += gcg_lines(models)
    lines += ["", "## ASR by decoding method (no attack)", "",
              "| model | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    lines += [f"| {n} | " + " | ".join(_cell(m["methods"][k]) for k in methods) + " |"
              for n, m in models.items()]
    cats = list(any_m["categories"])
    lines += ["", f"## ASR by hazard category ({am}, no attack)", "",
              "| model | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    lines += [f"| {n} | " + " | ".join(_cell(m["categories"][c]) for c in cats) + " |"
              for n, m in models.items()]
    lines += ["", f"## Helpfulness and over-refusal on safe queries ({am})", "",
              "| model | correct | dose correct | prescription correct | unsafe answers | "
              "refused |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {_cell(m['safe'][am]['correct'])} | {_cell(m['dose_correct'])} | "
              f"{_cell(m['prescribe_correct'])} | {_cell(m['safe'][am]['unsafe'])} | "
              f"{_cell(m['safe'][am]['over_refusal'])} |" for n, m in models.items()]
    lines += ["", "## Reflection accuracy on held-out passages", "",
              "Meaningful for models trained with reflections; the others show what chance "
              "looks like.", "",
              "| model | balanced accuracy | unsafe recall | safe recall | final train loss |",
              "|---|---|---|---|---|"]
    lines += [f"| {n} | {_cell(m['reflection']['balanced_accuracy'])} | "
              f"{_cell(m['reflection']['unsafe_recall'])} | "
              f"{_cell(m['reflection']['safe_recall'])} | {_cell(m['final_loss'], False)} |"
              for n, m in models.items()]
    lines += timing_table(results)
    lines += ["", "![ASR under attacks](plots/asr_attacks.png)",
              "![ASR by decoding method](plots/asr_methods.png)", ""]
    return "\n".join(lines)


def _bars(path: Path, models: dict[str, Any], key: str, title: str) -> None:
    from megatron_srp.evaluation.plots import asr_bars

    names = list(models)
    groups = list(next(iter(models.values()))[key])
    series = {}
    for g in groups:
        std = [models[n][key][g]["std"] for n in names]
        series[g] = ([models[n][key][g]["mean"] for n in names], std, std)
    asr_bars(path, names, series, title, rotate=20)


def write_report(cfg, out: Path) -> dict[str, Any]:
    from megatron_srp.medsafetyworld.finetune_attack import attack_table

    results = collect(cfg, out)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if results["models"]:
        (out / "plots").mkdir(exist_ok=True)
        _bars(out / "plots" / "asr_attacks.png", results["models"], "attacks",
              f"ASR under attacks ({results['attack_method']})")
        _bars(out / "plots" / "asr_methods.png", results["models"], "methods",
              "ASR by decoding method")
    (out / "report.md").write_text(markdown(results) + "\n".join(attack_table(cfg, out)))
    return results
