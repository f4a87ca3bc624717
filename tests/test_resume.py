"""Checkpoints: kill-and-resume replays an uninterrupted run exactly, a crash during a save
falls back to the previous complete checkpoint, and a mismatched model is refused clearly."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_srp.training.launch import (TINY, _kill_group, kill_when, records, run_pretrain,
                                         start_pretrain, train_losses, wait_for_no_processes)

STEPS = 20


def _args(dataset: str, save: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.paths=[{dataset}]", f"checkpoint.save={save}",
            f"train.train_iters={STEPS}", "checkpoint.save_interval=5", "train.eval_interval=10",
            *extra]


@pytest.fixture(scope="module")
def uninterrupted(shakespeare_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_pretrain(2, _args(shakespeare_dataset, out, "checkpoint.keep_last=10"))
    return out


def _latest(run: Path) -> str:
    p = run / "latest"
    return p.read_text().strip() if p.is_file() else ""


def test_kill_and_resume_matches_uninterrupted_run(uninterrupted, shakespeare_dataset, tmp_path):
    proc = start_pretrain(2, _args(shakespeare_dataset, tmp_path))
    kill_when(proc, lambda: _latest(tmp_path) == "iter_0000010")
    assert not wait_for_no_processes(proc.job_tag), "processes of the killed run are alive"
    assert (tmp_path / "iter_0000010" / "run.json").is_file()
    run_pretrain(2, _args(shakespeare_dataset, tmp_path))
    expected, got = train_losses(uninterrupted), train_losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    # Validation is resumed too: the same validation batches, the same numbers.
    assert [r["loss"] for r in records(tmp_path, "valid")][-1] == pytest.approx(
        [r["loss"] for r in records(uninterrupted, "valid")][-1], abs=1e-6)


def test_resume_with_another_data_parallel_size(uninterrupted, shakespeare_dataset, tmp_path):
    """Saved with DP=2, resumed with DP=1: the same global batches, the same losses up to the
    changed order of the gradient reduction (about 1e-5 after ten steps in fp32)."""
    import shutil
    shutil.copytree(uninterrupted / "iter_0000010", tmp_path / "iter_0000010")
    (tmp_path / "latest").write_text("iter_0000010\n")
    run_pretrain(1, _args(shakespeare_dataset, tmp_path))
    expected, got = train_losses(uninterrupted), train_losses(tmp_path)
    assert sorted(got) == list(range(11, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), f"step {step}"


def test_crash_during_save_resumes_from_previous_complete_checkpoint(
        uninterrupted, shakespeare_dataset, tmp_path):
    proc = run_pretrain(2, _args(shakespeare_dataset, tmp_path),
                        env={"SRP_CRASH_DURING_SAVE_AT": "10"}, check=False)
    assert proc.returncode != 0
    # The shards of step 10 were written, but the checkpoint was never committed.
    assert (tmp_path / "iter_0000010.partial").is_dir()
    assert not (tmp_path / "iter_0000010").exists()
    assert _latest(tmp_path) == "iter_0000005"

    resumed = run_pretrain(2, _args(shakespeare_dataset, tmp_path))
    assert "starting at step 5" in resumed.stdout + resumed.stderr
    assert not (tmp_path / "iter_0000010.partial").exists()  # cleaned by the next save
    expected, got = train_losses(uninterrupted), train_losses(tmp_path)
    for step in range(6, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"


def test_checkpoint_of_another_model_shape_is_refused(uninterrupted, shakespeare_dataset,
                                                      tmp_path):
    proc = run_pretrain(1, _args(shakespeare_dataset, tmp_path, f"checkpoint.load={uninterrupted}",
                                 "model.num_layers=2"), check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "does not match the configured model" in out
    assert "num_layers: checkpoint 4 vs config 2" in out


def _ranks(proc) -> list:
    """The training ranks torchrun started (its python children that run the script)."""
    import psutil

    return [c for c in psutil.Process(proc.pid).children(recursive=True)
            if any("pretrain_srp.py" in part for part in c.cmdline())]


def _wait_for(condition, timeout: float = 300) -> None:
    import time

    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition never reached"
        time.sleep(0.05)


def test_a_cluster_signal_stops_with_a_checkpoint_and_the_rerun_resumes_exactly(
        uninterrupted, shakespeare_dataset, tmp_path):
    """SIGUSR1 (what sbatch --signal sends before the time limit) to every rank: they agree to
    stop at the next step boundary, save a complete checkpoint there (not at a save interval),
    exit 75; the rerun resumes from it and replays the uninterrupted run's losses."""
    import signal

    proc = start_pretrain(2, _args(shakespeare_dataset, tmp_path))
    try:
        _wait_for(lambda: (tmp_path / "metrics.jsonl").exists()
                  and len(train_losses(tmp_path)) >= 6)
        for rank in _ranks(proc):
            rank.send_signal(signal.SIGUSR1)
        out = proc.communicate(timeout=300)[0]
    finally:
        _kill_group(proc.pid)
    stopped = int(_latest(tmp_path).removeprefix("iter_"))
    assert 6 <= stopped < STEPS, out[-3000:]
    assert f"stopped at step {stopped} of {STEPS} (SIGUSR1)" in out and "exitcode  : 75" in out
    assert (tmp_path / _latest(tmp_path) / "run.json").is_file()
    assert max(train_losses(tmp_path)) == stopped  # no step ran after the save
    resumed = run_pretrain(2, _args(shakespeare_dataset, tmp_path))
    assert f"starting at step {stopped}" in resumed.stdout
    expected, got = train_losses(uninterrupted), train_losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"


def test_ranks_die_with_their_launcher(shakespeare_dataset, tmp_path):
    """SIGKILL to torchrun alone (not its process group): the ranks die too, and nothing more
    is written into the run directory."""
    import time

    import psutil

    proc = start_pretrain(2, _args(shakespeare_dataset, tmp_path, "train.train_iters=100000",
                                   "checkpoint.save_interval=0"))
    try:
        _wait_for(lambda: (tmp_path / "metrics.jsonl").exists()
                  and len(train_losses(tmp_path)) >= 2)
        ranks = _ranks(proc)
        assert len(ranks) == 2
        proc.kill()
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(ranks, timeout=20)
        assert not alive, [r.pid for r in alive]
        # nor anything a rank started (Megatron's checkpoint-writer manager, its trackers)
        assert not wait_for_no_processes(proc.job_tag, timeout=20)
        size = (tmp_path / "metrics.jsonl").stat().st_size
        time.sleep(1.0)
        assert (tmp_path / "metrics.jsonl").stat().st_size == size
    finally:
        _kill_group(proc.pid)
