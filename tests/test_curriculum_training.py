"""Training through a curriculum switch with real torchrun/gloo jobs: a run killed before the
switch and resumed replays the uninterrupted run's losses, also with another DP size, and the
phase and drawn blend are logged."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megatron_srp.training.launch import (
    TINY, kill_when, records, run_pretrain, start_pretrain, train_losses, wait_for_no_processes,
)

STEPS = 20  # 160 samples; the switch at 0.5 is sample 80, the first sample of step 11


@pytest.fixture(scope="module")
def wiki_dataset(shared_data, tmp_path_factory) -> str:
    from megatron_srp.data.preprocess import preprocess
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

    prefix = tmp_path_factory.mktemp("wiki") / "wiki"
    preprocess([shared_data / "wikitext2" / "test.txt"], prefix,
               SRPTokenizer.from_dir(default_tokenizer_dir()), progress=False)
    return str(prefix)


def _args(safe: str, other: str, save: Path, *extra: str) -> list[str]:
    curriculum = (f"data.curriculum=[{{until: 0.5, blend: {{{safe}: 1.0}}}}, "
                  f"{{until: 1.0, blend: {{{safe}: 1.0, {other}: 1.0}}}}]")
    return [*TINY, curriculum, "data.blend_window=16", f"checkpoint.save={save}",
            f"train.train_iters={STEPS}", "train.lr=1e-3", "checkpoint.save_interval=5", *extra]


@pytest.fixture(scope="module")
def uninterrupted(shakespeare_dataset, wiki_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run_pretrain(2, _args(shakespeare_dataset, wiki_dataset, out, "checkpoint.keep_last=10"))
    return out, done.stdout


def test_phase_and_blend_are_logged_with_one_line_at_the_switch(uninterrupted):
    out, stdout = uninterrupted
    switch_lines = [line for line in stdout.splitlines() if "curriculum: phase" in line]
    assert len(switch_lines) == 1, stdout[-3000:]
    assert "phase 1 starts at sample 80 (50.0% of the token budget)" in switch_lines[0]
    logged = {r["step"]: r for r in records(out, "train") if "phase" in r}
    assert sorted(logged) == [5, 10, 15, 20]
    assert logged[10]["phase"] == 0 and logged[10]["blend/wiki"] == 0.0
    assert logged[20]["phase"] == 1 and logged[20]["blend/wiki"] == pytest.approx(0.5, abs=1 / 16)
    assert (out / "tensorboard").is_dir()


def test_kill_before_the_switch_and_resume_replays_the_run(uninterrupted, shakespeare_dataset,
                                                          wiki_dataset, tmp_path):
    expected_dir, _ = uninterrupted
    args = _args(shakespeare_dataset, wiki_dataset, tmp_path)
    proc = start_pretrain(2, args)
    kill_when(proc, lambda: (tmp_path / "latest").is_file()
              and (tmp_path / "latest").read_text().strip() == "iter_0000005")
    assert not wait_for_no_processes(proc.job_tag), "processes of the killed run are alive"
    run_pretrain(2, args)
    expected, got = train_losses(expected_dir), train_losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(6, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    assert [r.get("blend/wiki") for r in records(tmp_path, "train") if r["step"] == 20][-1] == \
        [r.get("blend/wiki") for r in records(expected_dir, "train") if r["step"] == 20][-1]


def test_resume_across_the_switch_with_another_data_parallel_size(
        uninterrupted, shakespeare_dataset, wiki_dataset, tmp_path):
    expected_dir, _ = uninterrupted
    shutil.copytree(expected_dir / "iter_0000005", tmp_path / "iter_0000005")
    (tmp_path / "latest").write_text("iter_0000005\n")
    run_pretrain(1, _args(shakespeare_dataset, wiki_dataset, tmp_path))
    expected, got = train_losses(expected_dir), train_losses(tmp_path)
    assert sorted(got) == list(range(6, STEPS + 1))
    for step in got:  # DP=2 -> DP=1 changes only the gradient reduction order
        assert got[step] == pytest.approx(expected[step], abs=1e-4), f"step {step}"
