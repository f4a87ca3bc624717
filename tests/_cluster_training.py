"""What the cluster training tests share (tests/test_slurm.py, tests/test_nemo_run_slurm.py): a
20-step tiny run with a checkpoint every 5 steps, waiting for its steps, its latest checkpoint,
and the comparison of its losses with an uninterrupted run's."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from megatron_srp.training.launch import train_losses

STEPS = 20


def latest_step(run: Path) -> int:
    """The step of the run's latest checkpoint; 0 when it has none."""
    p = run / "latest"
    return int(p.read_text().strip().removeprefix("iter_")) if p.is_file() else 0


def wait_steps(run: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ((run / "metrics.jsonl").exists() and len(train_losses(run)) >= n):
        assert time.monotonic() < deadline, f"fewer than {n} steps in {run} after {timeout} s"
        time.sleep(0.2)


def assert_same_losses(got: dict, expected: dict) -> None:
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
