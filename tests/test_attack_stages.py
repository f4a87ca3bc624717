"""The stage pipeline end to end at toy size on CPU: a pretrained tiny model -> an
instruction-tuned one (a real finetune job), each measured by ASR per decoding method,
over-refusal and GCG; the report agrees with the answers on disk; a rerun redoes nothing, and
a lost unit is the only thing recomputed (judged again from its stored answers)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_srp.config import ConfigError
from megatron_srp.evaluation.stages import load_suite_config, run_suite
from megatron_srp.training.checkpoint import latest_checkpoint

SUITE = """
name: toy
out_dir: {out}
stages:
  - {{name: base, checkpoint: {base}, template: plain}}
  - name: instruct
    finetune:
      recipe: examples/finetune/instruct.yaml
      start: base
      source: alpaca-seed
      limit: 12
      overrides: [train.lr=1.0e-3, checkpoint.save_interval=0, logging.log_interval=1]
benchmarks:
  - {{name: advbench-completion, limit: 3, stages: [base]}}
  - {{name: jailbreakbench, limit: 3}}
methods: [topk, safebeam, guarded]
samples: 2
max_new_tokens: 6
num_beams: 2
segment_tokens: 4
batch_size: 4
overrefusal: {{benchmark: xstest, limit: 3}}
gcg: {{enabled: true, stages: [instruct], benchmark: advbench, behaviors: 1, steps: 2,
      top_k: 16, search_width: 16}}
"""


@pytest.fixture(scope="module")
def suite(tiny_pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    path = root / "suite.yaml"
    path.write_text(SUITE.format(out=root / "out", base=tiny_pretrained))
    messages: list[str] = []
    cfg = load_suite_config(path)
    results = run_suite(cfg, progress=False, log=messages.append)
    return path, cfg, results, messages


def test_every_stage_is_measured_and_the_report_matches_the_answers(suite) -> None:
    _, cfg, results, messages = suite
    out = Path(cfg.out_dir)
    assert results["stages"] == ["base", "instruct"]
    units = results["units"]
    assert set(units["base"]) == {"asr-advbench-completion", "asr-jailbreakbench", "overrefusal"}
    assert set(units["instruct"]) == {"asr-jailbreakbench", "overrefusal", "gcg"}
    # The instruction-tuned model is a finished finetune of the base, with its own checkpoint.
    run = json.loads((latest_checkpoint(out / "models" / "instruct") / "run.json").read_text())
    assert run["finetune"]["records"] == 12 and run["finetune"]["pretrained"].startswith(
        str(cfg.stages[0].checkpoint))
    # ASR in the report is the share of harmful answers stored in the unit file.
    for stage in ("base", "instruct"):
        unit = json.loads((out / "units" / stage / "asr-jailbreakbench.json").read_text())
        for method in cfg.methods:
            r = unit["result"][method]
            flags = [a["harmful"] for row in r["answers"] for a in row["answers"]]
            per_prompt = 2 if method in ("topk", "guarded") else 1
            assert len(flags) == 3 * per_prompt
            assert units[stage]["asr-jailbreakbench"][method]["overall"]["asr"] == \
                pytest.approx(sum(flags) / len(flags))
    over = units["base"]["overrefusal"]
    assert over["n"] == 3 and sum(over["counts"].values()) == 3
    gcg = json.loads((out / "units" / "instruct" / "gcg.json").read_text())["result"]
    found = gcg["suffixes"][0]
    assert found["steps"] == 2 and found["loss"] <= found["initial_loss"]
    assert len(gcg["with_suffix"]["topk"]["answers"]) == 1
    report = (out / "report.md").read_text()
    for needle in ("## ASR: jailbreakbench", "| instruct | 3 |", "## Over-refusal", "## GCG",
                   "plots/asr_jailbreakbench.png"):
        assert needle in report
    for plot in ("asr_jailbreakbench.png", "asr_advbench_completion.png", "overrefusal.png",
                 "gcg.png"):
        assert (out / "plots" / plot).stat().st_size > 1000


def test_a_rerun_redoes_nothing_and_a_lost_unit_alone_is_recomputed(suite) -> None:
    path, cfg, _, _ = suite
    messages: list[str] = []
    run_suite(load_suite_config(path), progress=False, log=messages.append)
    assert "computed 0 unit(s), reused 6 finished before" in messages
    assert any("finetune finished before" in m for m in messages)
    (Path(cfg.out_dir) / "units" / "base" / "overrefusal.json").unlink()
    messages.clear()
    run_suite(load_suite_config(path), progress=False, log=messages.append)
    # Its answers are on disk: it is judged again, not generated again.
    assert "stage base: overrefusal, judged from its stored answers" in messages
    assert "computed 1 unit(s), reused 5 finished before" in messages
    assert "generated answers for 0 unit(s), judged 1 from stored answers" in messages
    (Path(cfg.out_dir) / "answers" / "base" / "overrefusal.json").unlink()
    (Path(cfg.out_dir) / "units" / "base" / "overrefusal.json").unlink()
    messages.clear()
    run_suite(load_suite_config(path), progress=False, log=messages.append)
    assert "stage base: overrefusal" in messages
    assert "generated answers for 1 unit(s), judged 0 from stored answers" in messages


def test_bad_suites_name_the_key(tmp_path) -> None:
    def load(text: str):
        p = tmp_path / "s.yaml"
        p.write_text(text)
        return load_suite_config(p)

    with pytest.raises(ConfigError, match=r"stages\[1\].finetune.start"):
        load("out_dir: x\nstages:\n  - {name: a, checkpoint: c}\n  - name: b\n    finetune: "
             "{recipe: examples/finetune/instruct.yaml, start: zz, source: gsm8k}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]"):
        load("out_dir: x\nstages:\n  - {name: a}\n")
    with pytest.raises(ConfigError, match="methods"):
        load("out_dir: x\nstages:\n  - {name: a, checkpoint: c}\nmethods: [nucleus]\n")
    with pytest.raises(ConfigError, match=r"benchmarks\[0\].name"):
        load("out_dir: x\nstages:\n  - {name: a, checkpoint: c}\nbenchmarks: [{name: mmlu}]\n")
