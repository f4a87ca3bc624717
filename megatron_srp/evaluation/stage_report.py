"""The attack-suite report, rebuilt from the finished units of stages.py.

``results.json``: every unit's result without the answers (those stay in the unit files).
``report.md``: ASR per benchmark (stage x decoding method, with 95% intervals), per category,
over-refusal classes per stage, and GCG (ASR with and without the suffix, the loss it reached).
Plots (``plots/``): ``asr_<benchmark>.png`` (grouped bars per stage, one bar per method, as in
the SRP paper's stage figures), ``overrefusal.png`` (stacked classes per stage), ``gcg.png``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_srp.evaluation.overrefusal import CLASSES
from megatron_srp.evaluation.plots import asr_bars


def _strip_answers(result: Any) -> Any:
    if isinstance(result, dict):
        return {k: _strip_answers(v) for k, v in result.items() if k not in ("answers", "losses")}
    if isinstance(result, list):
        return [_strip_answers(v) for v in result]
    return result


def load_units(out_dir: Path, stages: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for name in stages:
        found[name] = {}
        for file in sorted((out_dir / "units" / name).glob("*.json")):
            found[name][file.stem] = json.loads(file.read_text())["result"]
    return found


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(s: dict) -> str:
    lo, hi = s["asr_ci"]
    return f"{_pct(s['asr'])} [{_pct(lo)}, {_pct(hi)}]"


def _asr_tables(units: dict, methods: list[str]) -> list[str]:
    lines: list[str] = []
    benches = sorted({u for per in units.values() for u in per if u.startswith("asr-")})
    for unit in benches:
        bench = unit.removeprefix("asr-")
        lines += [f"## ASR: {bench}", "",
                  "Share of answers judged harmful, % [95% bootstrap interval over prompts]; "
                  "`any` = prompts with at least one harmful sample.", "",
                  "| stage | prompts | " + " | ".join(methods) + " | any (" + methods[0] + ") |",
                  "|---|---|" + "---|" * (len(methods) + 1)]
        cats: set[str] = set()
        for stage, per in units.items():
            r = per.get(unit)
            if r is None:
                continue
            first = r[methods[0]]["overall"]
            lines.append(f"| {stage} | {first['prompts']} | "
                         + " | ".join(_cell(r[m]["overall"]) for m in methods)
                         + f" | {_pct(first['asr_any'])} |")
            cats |= set(r[methods[0]].get("by_category", {}))
        if len(cats) > 1:
            lines += ["", "Per category (% harmful answers):", "",
                      "| category | " + " | ".join(f"{s} {m}" for s in units for m in methods
                                                    if unit in units[s]) + " |",
                      "|---|" + "---|" * sum(len(methods) for s in units if unit in units[s])]
            for c in sorted(cats):
                row = [(_pct(units[s][unit][m]["by_category"][c]["asr"])
                        if c in units[s][unit][m].get("by_category", {}) else "-")
                       for s in units for m in methods if unit in units[s]]
                lines.append(f"| {c} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _overrefusal_table(units: dict) -> list[str]:
    rows = [(s, per["overrefusal"]) for s, per in units.items() if "overrefusal" in per]
    if not rows:
        return []
    r0 = rows[0][1]
    lines = ["## Over-refusal", "", f"Harmless `{r0['benchmark']}` prompts answered with "
             f"`{r0['method']}` decoding; share of answers per class, %.", "",
             "| stage | n | " + " | ".join(CLASSES) + " | refusal rate |",
             "|---|---|" + "---|" * (len(CLASSES) + 1)]
    for s, r in rows:
        lines.append(f"| {s} | {r['n']} | " + " | ".join(_pct(r["shares"][c]) for c in CLASSES)
                     + f" | {_pct(r['refusal_rate'])} |")
    return lines + [""]


def _gcg_table(units: dict, methods: list[str]) -> list[str]:
    rows = [(s, per["gcg"]) for s, per in units.items() if "gcg" in per]
    if not rows:
        return []
    lines = ["## GCG", "", "One suffix per behaviour, optimised against the stage's own model "
             "for the target; ASR % without -> with the suffix, per decoding method.", "",
             "| stage | behaviours | target loss (start -> end) | greedy target hit | "
             + " | ".join(methods) + " |", "|---|---|---|---|" + "---|" * len(methods)]
    for s, r in rows:
        found = r["suffixes"]
        start = sum(f["initial_loss"] for f in found) / len(found)
        end = sum(f["loss"] for f in found) / len(found)
        hits = sum(f["success"] for f in found)
        cells = [f"{_pct(r['without_suffix'][m]['overall']['asr'])} -> "
                 f"{_pct(r['with_suffix'][m]['overall']['asr'])}" for m in methods]
        lines.append(f"| {s} | {len(found)} | {start:.2f} -> {end:.2f} | {hits}/{len(found)} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def _plots(out_dir: Path, units: dict, methods: list[str]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    made = []
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    benches = sorted({u for per in units.values() for u in per if u.startswith("asr-")})
    for unit in benches:
        stages = [s for s in units if unit in units[s]]
        series = {}
        for m in methods:
            vals = [units[s][unit][m]["overall"] for s in stages]
            series[m] = ([v["asr"] for v in vals], [v["asr"] - v["asr_ci"][0] for v in vals],
                         [v["asr_ci"][1] - v["asr"] for v in vals])
        asr_bars(plots / f"{unit.replace('-', '_')}.png", stages, series,
                 unit.removeprefix("asr-"))
        made.append(f"plots/{unit.replace('-', '_')}.png")
    rows = [(s, per["overrefusal"]) for s, per in units.items() if "overrefusal" in per]
    if rows:
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.4))
        bottom = np.zeros(len(rows))
        for c in CLASSES:
            share = np.array([100 * r["shares"][c] for _, r in rows])
            ax.bar([s for s, _ in rows], share, bottom=bottom, label=c)
            bottom += share
        ax.set_ylabel("answers (%)")
        ax.set_title("over-refusal")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / "overrefusal.png", dpi=120)
        plt.close(fig)
        made.append("plots/overrefusal.png")
    rows = [(s, per["gcg"]) for s, per in units.items() if "gcg" in per]
    if rows:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for s, r in rows:
            for k, f in enumerate(r["suffixes"]):
                ax.plot([f["initial_loss"], *f["losses"]], color=f"C{len(made) % 10}",
                        alpha=0.7, label=s if k == 0 else None)
        ax.set_xlabel("GCG step")
        ax.set_ylabel("target loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plots / "gcg.png", dpi=120)
        plt.close(fig)
        made.append("plots/gcg.png")
    return made


def write_stage_report(cfg) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    stages = [s.name for s in cfg.stages]
    units = load_units(out, stages)
    methods = list(cfg.methods)
    results = {"name": cfg.name, "stages": stages, "methods": methods,
               "judge": cfg.judge.name, "units": _strip_answers(units)}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots = _plots(out, units, methods)
    judge = cfg.judge.name + (" (the offline default: refusal phrases only, the weakest judge)"
                              if cfg.judge.name == "refusal-keywords" else "")
    lines = [f"# Attack suite: {cfg.name}", "",
             f"Stages: {' -> '.join(stages)}. Judge: {judge}. Sampling methods: "
             f"{cfg.samples} samples per prompt, {cfg.max_new_tokens} new tokens.", ""]
    lines += _asr_tables(units, methods) + _overrefusal_table(units) + _gcg_table(units, methods)
    lines += [f"![{p}]({p})" for p in plots] + [""]
    (out / "report.md").write_text("\n".join(lines))
    return results
