"""The names of an experiment's models and where each is trained: ``srp``, its noisy-classifier
twin ``srp-noisy``, its curriculum-timing twin ``srp@60``; one run directory per model and seed.
Apart from experiment.py so the report and the finetuning attacks can name models without
importing the runner."""
from __future__ import annotations

from pathlib import Path


def model_names(cfg) -> list[str]:
    """Every trained dataset mix: the variants, their noisy-classifier twins, then their
    curriculum-timing twins."""
    names = list(cfg.variants)
    if cfg.noisy_error_rate > 0:
        names += [f"{v}-noisy" for v in cfg.noisy_variants if v in cfg.variants]
    names += [switch_name(v, s) for v in cfg.switch_variants for s in cfg.switch_at]
    return names


def switch_name(variant: str, switch_at: float) -> str:
    return f"{variant}@{round(100 * switch_at)}"


def parse_model(name: str) -> tuple[str, bool, float]:
    """``srp-noisy`` -> (srp, True, 0.0); ``srp@60`` -> (srp, False, 0.6)."""
    name, _, pct = name.partition("@")
    return name.removesuffix("-noisy"), name.endswith("-noisy"), int(pct or 0) / 100


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name}-s{seed}"
