"""The stop flag behind graceful preemption, in this process (no process group): a caught
signal or a spent time budget says why to stop; names a process cannot catch are refused.
tests/test_resume.py stops and resumes a real two-rank run."""
from __future__ import annotations

import os
import signal
import time

import pytest

from megatron_srp.training.stopping import StopWatch
from megatron_srp.training.trainer import _seconds_to_next_save
from megatron_srp.validation import signal_numbers


def test_a_caught_signal_is_the_reason_to_stop():
    before = signal.getsignal(signal.SIGUSR2)
    watch = StopWatch(["SIGUSR2", "usr1"], None)
    try:
        assert watch.should_stop(1e9) is None  # no budget: any time to the next save is fine
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal does not change the reason
        assert watch.should_stop(0.0) == "SIGUSR2"
    finally:
        watch.restore()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_the_budget_stops_when_the_next_save_would_come_too_late():
    watch = StopWatch([], exit_duration_minutes=1.0)
    assert watch.should_stop(seconds_to_next_save=30.0) is None
    assert watch.should_stop(seconds_to_next_save=61.0) == "exit_duration"
    late = StopWatch([], exit_duration_minutes=0.001)  # 60 ms
    time.sleep(0.1)
    assert late.should_stop(0.0) == "exit_duration"


def test_seconds_to_the_next_save_use_the_recent_step_time():
    assert _seconds_to_next_save(12, 5, 100, [2.0] * 20) == 3 * 2.0  # next save at 15
    assert _seconds_to_next_save(12, 0, 20, [1.0, 3.0]) == 8 * 2.0  # no interval: the end
    assert _seconds_to_next_save(98, 50, 100, [1.0]) == 2.0


@pytest.mark.parametrize("name", ["SIGKILL", "KILL", "SIGSTOP", "SIGNOPE", "TERMINATE"])
def test_signals_that_cannot_be_caught_are_refused_by_name(name):
    with pytest.raises(ValueError, match=f"train.exit_signals: '{name}'"):
        signal_numbers([name])
    assert signal_numbers(["SIGTERM", "usr1"]) == [signal.SIGTERM, signal.SIGUSR1]


def test_a_helper_started_while_ignoring_survives_the_stop_signal():
    """What the cluster does: SIGTERM to every process of the job. A spawned helper started
    inside ``ignored`` (as the trainer starts Megatron-Core's checkpoint queue manager) lives
    on; one started outside dies; after the block this process catches the signal again."""
    import multiprocessing as mp

    spawn = mp.get_context("spawn")
    watch = StopWatch(["SIGTERM"], None)
    try:
        with watch.ignored():
            helper = spawn.Process(target=time.sleep, args=(2,))
            helper.start()
        exposed = spawn.Process(target=time.sleep, args=(2,))
        exposed.start()
        time.sleep(1.0)  # both interpreters are up
        for proc in (helper, exposed):
            os.kill(proc.pid, signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        helper.join(timeout=20)
        exposed.join(timeout=20)
        assert helper.exitcode == 0
        assert exposed.exitcode == -signal.SIGTERM
        assert watch.should_stop(1e9) == "SIGTERM"
    finally:
        watch.restore()


def test_the_stop_marker_is_written_only_when_asked_for(tmp_path, monkeypatch):
    import json

    from megatron_srp.training.stopping import STOP_MARKER_ENV, record_stop

    monkeypatch.delenv(STOP_MARKER_ENV, raising=False)
    assert record_stop("SIGTERM", 7, "/run/iter_0000007") is None
    marker = tmp_path / "logs" / "stopped.json"
    monkeypatch.setenv(STOP_MARKER_ENV, str(marker))
    assert record_stop("SIGUSR1", 7, "/run/iter_0000007") == marker
    assert json.loads(marker.read_text()) == {"reason": "SIGUSR1", "iteration": 7,
                                              "checkpoint": "/run/iter_0000007"}


def _rank_stop_reason(rank: int, init_file: str, signals: dict, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    watch = StopWatch(["SIGTERM", "SIGUSR1"], None)
    try:
        if rank in signals:
            os.kill(os.getpid(), getattr(signal, signals[rank]))
        reason = watch.should_stop(1e9)
    finally:
        watch.restore()
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(str(reason))


@pytest.mark.parametrize("signals, expected", [({1: "SIGUSR1"}, "SIGUSR1"),
                                               ({0: "SIGUSR1", 1: "SIGTERM"}, "SIGTERM")])
def test_every_rank_names_the_same_signal(tmp_path, signals, expected):
    """A cluster signals the nodes one after another: at a step boundary one rank may have
    the signal and another not yet, or each a different one. Two real gloo ranks: both name
    the same signal, the one a rank received (the higher number when they differ)."""
    import torch.multiprocessing as tmp

    out = str(tmp_path / "reason")
    tmp.spawn(_rank_stop_reason, args=(str(tmp_path / "init"), signals, out), nprocs=2)
    assert [open(f"{out}.{r}").read() for r in (0, 1)] == [expected, expected]
