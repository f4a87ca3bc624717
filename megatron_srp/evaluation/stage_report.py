"""The attack-suite report, rebuilt from the finished units of stages.py.

Only the units the current config names, each with the stamp the config gives it, enter the
tables; anything else in ``units/`` (a benchmark since removed, a unit scored by another judge
or of an older model) is listed as stale at the end of the report, never mixed in.

``results.json``: every unit's result without the answers (those stay in the unit files).
``report.md``: ASR per benchmark (stage x decoding method, with 95% intervals), per category,
over-refusal classes per stage, and GCG (ASR with and without the suffix, the loss it reached).
Plots (``plots/``): ``asr_<benchmark>.png`` (grouped bars per stage, one bar per method, as in
the SRP paper's stage figures), ``overrefusal.png`` (stacked classes per stage), ``gcg.png``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_srp.evaluation.overrefusal import CLASSES
from megatron_srp.evaluation.plots import asr_bars
from megatron_srp.units import Units, write_atomic


def _strip_answers(result: Any) -> Any:
    if isinstance(result, dict):
        return {k: _strip_answers(v) for k, v in result.items() if k not in ("answers", "losses")}
    if isinstance(result, list):
        return [_strip_answers(v) for v in result]
    return result


def load_units(out_dir: Path, stages: list[str], wanted: dict[str, str]
               ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The results of the wanted units (``"<stage>/<unit>"`` -> stamp) stored with that stamp,
    per stage; and every other stored unit, as stale."""
    store = Units(out_dir / "units")
    found: dict[str, dict[str, Any]] = {name: {} for name in stages}
    for name, want in wanted.items():
        saved = store.get(name, want)
        if saved is not None:
            stage, unit = name.split("/", 1)
            found[stage][unit] = saved["result"]
    return found, store.stale(wanted)


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
            first = r[methods[0]]["overall"] if methods[0] in r else None
            some = next(r[m]["overall"] for m in methods if m in r)
            lines.append(f"| {stage} | {some['prompts']} | "
                         + " | ".join(_cell(r[m]["overall"]) if m in r else "-"
                                      for m in methods)
                         + f" | {_pct(first['asr_any']) if first else '-'} |")
            cats |= {c for m in methods if m in r for c in r[m].get("by_category", {})}
        causes = [(stage, per[unit]["guarded"]["refusals_by_cause"]) for stage, per
                  in units.items() if unit in per and "refusals_by_cause"
                  in per[unit].get("guarded", {})]
        if causes:
            lines += ["", "Guarded refusals by cause (answers): *unsafe* the model wrote "
                      "Unsafe, *malformed* a label that is neither, *unread* no room to read it "
                      "(the last two are fail-closed, not the monitor).", "",
                      "| stage | unsafe | malformed | unread |", "|---|---|---|---|"]
            lines += [f"| {stage} | {c.get('unsafe', 0)} | {c.get('malformed', 0)} | "
                      f"{c.get('unread', 0)} |" for stage, c in causes]
        if len(cats) > 1:
            lines += ["", "Per category (% harmful answers):", "",
                      "| category | " + " | ".join(f"{s} {m}" for s in units for m in methods
                                                    if unit in units[s]) + " |",
                      "|---|" + "---|" * sum(len(methods) for s in units if unit in units[s])]
            for c in sorted(cats):
                row = [(_pct(units[s][unit][m]["by_category"][c]["asr"])
                        if c in units[s][unit].get(m, {}).get("by_category", {}) else "-")
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
                 f"{_pct(r['with_suffix'][m]['overall']['asr'])}"
                 if m in r["with_suffix"] else "-" for m in methods]
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
        for m in methods:  # a stage not decoded with a method gets no bar (NaN)
            vals = [units[s][unit][m]["overall"] if m in units[s][unit]
                    else {"asr": float("nan"), "asr_ci": (float("nan"),) * 2} for s in stages]
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
    for old in plots.glob("*.png"):  # a figure of a unit no longer reported would mislead
        if f"plots/{old.name}" not in made:
            old.unlink()
    return made


def _guard_line(cfg) -> list[str]:
    if not any("guarded" in (st.methods or cfg.methods) for st in cfg.stages):
        return []
    if cfg.guard_fail_open:
        return ["Guarded decoding **fails open**: an answer whose reflection is malformed or "
                "missing is let through.", ""]
    return ["Guarded decoding fails closed: an answer whose reflection is malformed or missing "
            "is refused.", ""]


def _stale_section(stale: list[dict[str, Any]]) -> list[str]:
    if not stale:
        return []
    return (["## Stale units (not in this report)", "",
             "Stored under `units/` but not part of this report: left over from an earlier "
             "config, or scored with other settings, another model or another judge.", "",
             "| unit | why | stamp |", "|---|---|---|"]
            + [f"| {s['unit']} | {s['why']} | {s['stamp']} |" for s in stale] + [""])


def write_stage_report(cfg, wanted: dict[str, str]) -> dict[str, Any]:
    """report.md, results.json and plots from the units ``wanted`` names with their stamps."""
    out = Path(cfg.out_dir)
    stages = [s.name for s in cfg.stages]
    units, stale = load_units(out, stages, wanted)
    missing = sorted(n for n in wanted if n.split("/", 1)[1] not in units[n.split("/", 1)[0]])
    methods = list(dict.fromkeys([*cfg.methods, *(m for st in cfg.stages
                                                   for m in st.methods or [])]))
    results = {"name": cfg.name, "stages": stages, "methods": methods,
               "judge": cfg.judge.name, "guard_fail_open": cfg.guard_fail_open,
               "units": _strip_answers(units), "missing": missing, "stale": stale}
    write_atomic(out / "results.json", results)
    plots = _plots(out, units, methods)
    judge = cfg.judge.name + (" (the offline default: refusal phrases only, the weakest judge)"
                              if cfg.judge.name == "refusal-keywords" else "")
    lines = [f"# Attack suite: {cfg.name}", "",
             f"Stages: {' -> '.join(stages)}. Judge: {judge}. Sampling methods: "
             f"{cfg.samples} samples per prompt, {cfg.max_new_tokens} new tokens.", ""]
    lines += _guard_line(cfg)
    if missing:
        lines += [f"Not finished: {', '.join(missing)}.", ""]
    lines += _asr_tables(units, methods) + _overrefusal_table(units) + _gcg_table(units, methods)
    lines += [f"![{p}]({p})" for p in plots] + [""]
    lines += _stale_section(stale)
    write_atomic(out / "report.md", "\n".join(lines))
    return results
