"""The evaluation report, rebuilt from finished units: ``results.json``, ``report.md``, plots.

``reflection_accuracy.png``: balanced accuracy and AUC of each reflection-accuracy method per
checkpoint (balanced, so that a model that calls everything safe sits at 0.5).
``probe_auc.png``: probe test AUC (mean, with the standard deviation over seeds as error bars)
for the first, middle and last layer, one line per checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from megatron_srp.units import Units, write_atomic

LAYERS = ("first", "middle", "last")


def _load_units(out_dir: Path, wanted: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The units ``wanted`` names (``"<checkpoint>/<unit>"`` -> stamp), stored with that stamp."""
    store = Units(out_dir / "units")
    results: dict[str, dict[str, Any]] = {}
    for name, want in wanted.items():
        ck, unit = name.split("/", 1)
        results.setdefault(ck, {})
        saved = store.get(name, want)
        if saved is not None:
            results[ck][unit] = saved["result"]
    return results


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(cfg, results: dict[str, dict[str, Any]]) -> str:
    lines = ["# Evaluation", "", f"Labelled segments: `{cfg.data.labels}` (context "
             f"`{cfg.data.context}`, at most {cfg.data.max_segments}, seed {cfg.data.seed}).", ""]
    refl = [(n, u, r) for n, units in results.items() for u, r in units.items()
            if u.startswith("reflection_")]
    if refl:
        lines += ["## Reflection accuracy", "",
                  "| checkpoint | method | n | accuracy | balanced accuracy | unsafe F1 | AUC | "
                  "malformed |", "|---|---|---|---|---|---|---|---|"]
        for name, unit, r in refl:
            f1 = r.get("per_class", {}).get("unsafe", {}).get("f1")
            lines.append(f"| {name} | {r['method']} | {r['n']} | {_fmt(r['accuracy'])} | "
                         f"{_fmt(r.get('balanced_accuracy'))} | {_fmt(f1)} | {_fmt(r['auc'])} | "
                         f"{r.get('malformed', '-')} |")
        lines += ["", "Per-category F1 of the models' own reflections (categories with support):",
                  ""]
        for name, unit, r in refl:
            if r["method"] != "reflection":
                continue
            cats = {c: v for c, v in r.get("per_category", {}).items() if v["support"]}
            lines.append(f"- **{name}**: " + (", ".join(
                f"{c} {v['f1']:.2f} (n={v['support']})" for c, v in cats.items()) or "none"))
        lines.append("")
    probes = [(n, units["probes"]) for n, units in results.items() if "probes" in units]
    if probes:
        lines += ["## Linear probes", "",
                  "Test AUC, mean ± standard deviation over seeds (layer number in brackets).", "",
                  "| checkpoint | " + " | ".join(LAYERS) + " |",
                  "|---|" + "---|" * len(LAYERS)]
        for name, p in probes:
            cells = [f"{p[layer]['auc_mean']:.3f} ± {p[layer]['auc_std']:.3f} "
                     f"({p[layer].get('layer', '?')})" if layer in p else "-" for layer in LAYERS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], out_dir: Path) -> list[str]:
    """The report's figures (PNG); returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = list(results)
    methods = sorted({u for units in results.values() for u in units if u.startswith("reflection_")})
    if methods:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        width = 0.8 / len(methods)
        for k, unit in enumerate(methods):
            for ax, key in zip(axes, ("balanced_accuracy", "auc")):
                # A probe is tested on balanced data: its accuracy is a balanced accuracy.
                values = [results[n].get(unit, {}).get(key, results[n].get(unit, {}).get(
                    "accuracy") if key == "balanced_accuracy" else None) for n in names]
                xs = [i + k * width for i in range(len(names))]
                ax.bar(xs, [v if v is not None else 0 for v in values], width,
                       label=unit.removeprefix("reflection_"))
        for ax, title in zip(axes, ("balanced accuracy", "AUC of P(unsafe)")):
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
            ax.set_ylim(0, 1)
            ax.set_title(title)
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        axes[0].legend(fontsize=8)
        fig.suptitle("Reflection accuracy")
        fig.tight_layout()
        fig.savefig(out_dir / "reflection_accuracy.png", dpi=120)
        plt.close(fig)
        written.append("reflection_accuracy.png")
    if any("probes" in units for units in results.values()):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for n in names:
            p = results[n].get("probes")
            if not p:
                continue
            layers = [layer for layer in LAYERS if layer in p]
            ax.errorbar(layers, [p[layer]["auc_mean"] for layer in layers],
                        yerr=[p[layer]["auc_std"] for layer in layers], marker="o", capsize=3,
                        label=n)
        ax.set_ylim(0.4, 1.0)
        ax.set_ylabel("test AUC")
        ax.set_title("Linear probes: safe vs unsafe")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "probe_auc.png", dpi=120)
        plt.close(fig)
        written.append("probe_auc.png")
    return written


def write_report(cfg, names: list[str], units: list[str], wanted: dict[str, str]
                 ) -> dict[str, Any]:
    """results.json, report.md and the plots from the units ``wanted`` names with their stamps
    under ``cfg.out_dir``; other stored units are listed as stale at the end."""
    out_dir = Path(cfg.out_dir)
    results = _load_units(out_dir, wanted)
    stale = Units(out_dir / "units").stale(wanted)
    complete = all(len(results[n]) == len(units) for n in names)
    figures = plot(results, out_dir)
    text = markdown(cfg, results)
    if figures:
        text += "\n" + "\n".join(f"![{f}]({f})" for f in figures) + "\n"
    if stale:
        text += ("\n## Stale units (not in this report)\n\n"
                 + "".join(f"- {s['unit']}: {s['why']}\n" for s in stale))
    data = {"complete": complete, "labels": cfg.data.labels, "checkpoints": names,
            "results": results, "figures": figures, "stale": stale}
    write_atomic(out_dir / "results.json", data)
    write_atomic(out_dir / "report.md", text)
    return data
