"""The one bar chart the attack reports draw: ASR in % per group, one bar per series."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def asr_bars(path: Path, groups: Sequence[str], series: dict[str, tuple[list[float],
             list[float], list[float]]], title: str, rotate: int = 0) -> None:
    """``series``: name -> (values, error below, error above), all fractions in [0, 1] and one
    per group; drawn as grouped bars in % with error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(groups), 3.4))
    x = np.arange(len(groups))
    for j, (name, (vals, lo, hi)) in enumerate(series.items()):
        ax.bar(x + (j - (len(series) - 1) / 2) * width, 100 * np.array(vals), width,
               yerr=100 * np.array([lo, hi]), capsize=2, label=name)
    ax.set_xticks(x, list(groups), rotation=rotate)
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
