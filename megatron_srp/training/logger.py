"""Where training numbers go: a console line, a progress bar, TensorBoard, metrics.jsonl, W&B.

Only the logging rank (last pipeline stage, first TP and DP rank) writes; others stay silent.
``metrics.jsonl`` holds one JSON object per logged step and is what tests and reports read.
It is strict JSON: a figure that does not exist (MFU on a CPU, a diverged loss) is ``null``.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from megatron_srp.units import json_safe


def _fmt(key: str, value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return f"{key} n/a"
    if key in ("lr",):
        return f"{key} {value:.3e}"
    if key in ("mfu",):
        return f"{key} {100 * value:.1f}%"
    if key.endswith("_gb"):
        return f"{key} {value:.2f}"
    if key.endswith("_s") and key != "tokens_per_s":
        return f"{key} {value:.3f}"
    if key == "tokens_per_s":
        return f"tok/s {value:,.0f}"
    return f"{key} {value:.4g}"


class RunLogger:
    def __init__(self, enabled: bool, total_steps: int, start_step: int, out_dir: Optional[str],
                 tensorboard_dir: Optional[str], wandb_project: Optional[str], run_name: str,
                 progress_bar: bool, config: dict):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.jsonl = None
        self.bar = None
        if not enabled:
            return
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(out_dir) / "metrics.jsonl", "a", buffering=1)
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed "
                                   "(pip install wandb)") from exc
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config,
                                    resume="allow")
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, leave=True)

    def info(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(message)

    def step(self, step: int, metrics: dict[str, float], console: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if "loss" in metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        self.record(step, metrics, "train")
        if console:
            self.info(f"step {step:>6} | " + " | ".join(_fmt(k, v) for k, v in metrics.items()))

    def record(self, step: int, metrics: dict[str, float], split: str) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            record = json_safe({"step": step, "split": split, **metrics})
            self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if not (isinstance(v, float) and math.isnan(v)):
                    self.tb.add_scalar(f"{split}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
