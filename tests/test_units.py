"""Resumable units (megatron_srp/units.py): stamps, atomic writes that survive a kill, stamped
unit folders, and run directories whose changed stamp moves the old run aside and trains again;
and the test suite's own rule for missing shared data in CI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_srp.training.checkpoint import latest_checkpoint, run_finished
from megatron_srp.training.launch import TINY, run_job
from megatron_srp.units import (RUN_STAMP_FILE, Units, prepare_run_dir, run_stamp, stamp,
                                unit_stamp, write_atomic)

REPO = Path(__file__).resolve().parent.parent


def test_a_stamp_is_stable_and_covers_settings_reads_and_version() -> None:
    assert stamp({"a": 1, "b": [2, 3]}) == stamp({"b": [2, 3], "a": 1})
    assert len(stamp({"a": 1})) == 16
    base = unit_stamp({"lr": 1e-3}, ["abc"], 1)
    assert base == unit_stamp({"lr": 1e-3}, ["abc"], 1)
    assert len({base, unit_stamp({"lr": 2e-3}, ["abc"], 1), unit_stamp({"lr": 1e-3}, ["abd"], 1),
                unit_stamp({"lr": 1e-3}, ["abc"], 2)}) == 4


def test_units_are_done_only_with_their_stamp_and_leftovers_are_stale(tmp_path) -> None:
    units = Units(tmp_path / "units")
    units.put("base/asr-a", "s1", {"asr": 0.5}, stage="base")
    units.put("base/asr-b", "s2", {"asr": 0.1})
    assert units.done("base/asr-a", "s1") and not units.done("base/asr-a", "other")
    assert units.get("base/asr-a", "s1")["result"] == {"asr": 0.5}
    assert units.names() == ["base/asr-a", "base/asr-b"]
    stale = units.stale({"base/asr-a": "new"})
    assert [(s["unit"], s["why"]) for s in stale] == [
        ("base/asr-a", "stored with another stamp"), ("base/asr-b", "not in the current config")]
    (tmp_path / "units" / "base" / "asr-c.json").write_text("{half a fi")
    assert not units.done("base/asr-c", "s3")


_KILLER = """
import os, signal, sys
import megatron_srp.units as units
where = sys.argv[2]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if where == "fsync":
    units.os.fsync = die           # the new answers are in the temporary file, not yet synced
else:
    units.os.replace = die         # synced, about to be renamed over the old file
units.write_atomic(sys.argv[1], {"answers": ["new"] * 200000})
"""


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_a_process_killed_while_writing_answers_leaves_the_previous_file_intact(
        tmp_path, where) -> None:
    path = tmp_path / "answers" / "base" / "asr-x.json"
    write_atomic(path, {"answers": ["old"]})
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(path), where], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert json.loads(path.read_text()) == {"answers": ["old"]}
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == [path.name]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path) -> None:
    path = tmp_path / "r.json"
    write_atomic(path, "old\n")
    with pytest.raises(TypeError):
        write_atomic(path, {"x": object()})  # not JSON-able: fails before anything is written
    blocked = tmp_path / "blocked.json"     # the rename itself fails: a folder is in the way
    (blocked / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        write_atomic(blocked, {"x": 1})
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["blocked.json", "r.json"]


def test_run_directories_with_another_stamp_are_moved_aside_never_reused(tmp_path) -> None:
    run = tmp_path / "models" / "instruct"
    assert prepare_run_dir(run, "aaaaaaaa11", {"lr": 1}, finished=run_finished).state == "fresh"
    assert run_stamp(run) == "aaaaaaaa11"
    (run / "metrics.jsonl").write_text("{}\n")  # a killed run: no finished checkpoint
    assert prepare_run_dir(run, "aaaaaaaa11", finished=run_finished).state == "resume"
    state = prepare_run_dir(run, "bbbbbbbb22", finished=run_finished)
    assert state.state == "fresh" and state.moved_to == run.with_name("instruct.stale-aaaaaaaa")
    assert (state.moved_to / "metrics.jsonl").exists() and not (run / "metrics.jsonl").exists()
    assert json.loads((run / RUN_STAMP_FILE).read_text())["stamp"] == "bbbbbbbb22"
    # Back to the first settings: the run kept aside is not taken back; it trains afresh.
    (run / "metrics.jsonl").write_text("{}\n")
    again = prepare_run_dir(run, "aaaaaaaa11", finished=run_finished)
    assert again.state == "fresh" and again.moved_to.name == "instruct.stale-bbbbbbbb"
    (run / "metrics.jsonl").write_text("{}\n")
    third = prepare_run_dir(run, "bbbbbbbb22", finished=run_finished)
    assert third.moved_to.name == "instruct.stale-aaaaaaaa-2"
    # A run without a stamp (trained before stamps) is not trusted either.
    legacy = tmp_path / "models" / "legacy"
    legacy.mkdir()
    (legacy / "latest_checkpointed_iteration.txt").write_text("4")
    moved = prepare_run_dir(legacy, "cccc", finished=run_finished).moved_to
    assert moved.name == "legacy.stale-unstamped"


def test_run_job_trains_again_when_the_stamp_changes_and_keeps_the_old_run(
        shakespeare_dataset, tmp_path) -> None:
    run, logs = tmp_path / "run", tmp_path / "logs"
    args = [*TINY, f"data.paths=[{shakespeare_dataset}]", f"checkpoint.save={run}",
            "train.train_iters=3", "train.warmup_iters=1"]
    messages: list[str] = []
    assert run_job(1, args, run, logs / "a.log", stamp="1111111111", log=messages.append)
    assert run_finished(run) and run_stamp(run) == "1111111111"
    first = (latest_checkpoint(run) / "run.json").read_text()
    assert not run_job(1, args, run, logs / "b.log", stamp="1111111111")  # same stamp: reused
    # Another stamp (e.g. a changed override): the finished run is kept aside, a new one trains.
    assert run_job(1, args, run, logs / "c.log", stamp="2222222222", log=messages.append)
    aside = tmp_path / "run.stale-11111111"
    assert (latest_checkpoint(aside) / "run.json").read_text() == first
    assert run_finished(run) and run_stamp(run) == "2222222222"
    assert any(str(aside) in m for m in messages)


def test_in_ci_missing_shared_data_fails_the_run_and_outside_ci_the_skips_are_counted(
        tmp_path) -> None:
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_needs_data.py").write_text(textwrap.dedent("""
        def test_one(shared_data):
            pass

        def test_two(shared_data):
            pass

        def test_without():
            pass
    """))
    env = {**os.environ, "SRP_SHARED_DATA": str(tmp_path / "no-such-folder"), "CI": "true"}

    def pytest_in(env):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    ci = pytest_in(env)
    assert ci.returncode != 0, ci.stdout
    assert "CI=true and shared data directory" in ci.stdout + ci.stderr
    assert "no-such-folder not found" in ci.stdout + ci.stderr
    local = pytest_in({k: v for k, v in env.items() if k != "CI"})
    assert local.returncode == 0, local.stdout
    assert "2 test(s) skipped: no shared data" in local.stdout


def test_staged_directory_appears_whole_or_not_at_all(tmp_path) -> None:
    from megatron_srp.units import staged_directory

    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="halfway"):
        with staged_directory(out) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("halfway")
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with staged_directory(out) as staging:
        (staging / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # nothing shows before the block ends
    assert [p.name for p in out.iterdir()] == ["new.txt"] and out.stat().st_mode & 0o755 == 0o755
