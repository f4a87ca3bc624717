"""The attack suite's per-stage options (``stages[].methods``, ``stages[].window``), the report
with stages decoded by different methods, and the post-training report's arithmetic."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from megatron_srp.config import ConfigError
from megatron_srp.evaluation.asr import attack_success
from megatron_srp.evaluation.posttrain_report import balanced_accuracy, ranking_auc
from megatron_srp.evaluation.stage_config import load_suite_config, stage_methods
from megatron_srp.evaluation.stage_report import _asr_tables
from megatron_srp.evaluation.stage_units import answer_settings

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "real_model" / "attack.yaml"


def test_the_real_model_config_loads_with_stage_methods():
    cfg = load_suite_config(CONFIG)
    got = {st.name: stage_methods(cfg, st) for st in cfg.stages}
    assert got == {"import": ["greedy"], "reflect": ["greedy", "guarded"],
                   "reflect-both": ["greedy", "guarded"], "refusal-sft": ["greedy"]}
    assert [st.window for st in cfg.stages] == [None, 1152, 1152, 1152]


@pytest.mark.parametrize("stage, field, value", [
    (1, "methods", ["greedy", "nucleus"]), (1, "methods", []), (2, "window", 64)])
def test_bad_stage_options_name_the_key(stage, field, value, tmp_path):
    data = yaml.safe_load(CONFIG.read_text())
    data["stages"][stage][field] = value
    bad = tmp_path / "suite.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"stages\[{stage}\]\.{field}"):
        load_suite_config(bad)


def test_stamps_of_stages_without_the_options_are_unchanged():
    """A stage that sets neither option asks exactly what it asked before they existed, so
    earlier runs' stored answers stay valid."""
    cfg = load_suite_config(CONFIG)
    plain = cfg.stages[0]
    s = answer_settings(cfg, plain, "asr-jailbreakbench")
    assert "window" not in s and s["methods"] == list(cfg.methods)
    windowed = answer_settings(cfg, cfg.stages[2], "asr-jailbreakbench")
    assert windowed["window"] == 1152
    assert answer_settings(cfg, cfg.stages[1], "asr-jailbreakbench")["methods"] == \
        ["greedy", "guarded"]


def _result(flags: list[bool]) -> dict:
    return {**attack_success([[f] for f in flags], ["none"] * len(flags)),
            "refusals_by_cause": {}}


def test_report_marks_methods_a_stage_was_not_decoded_with():
    units = {"import": {"asr-x": {"greedy": _result([True, False, False, False])}},
             "reflect": {"asr-x": {"greedy": _result([True, True, False, False]),
                                   "guarded": _result([False, False, False, False])}}}
    lines = _asr_tables(units, ["greedy", "guarded"])
    rows: dict[str, str] = {}
    for line in lines:  # the ASR table's rows come first (the causes table follows)
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line)
    assert rows["import"].split(" | ")[3] == "-"
    assert rows["import"].split(" | ")[2].startswith("25.0")
    assert rows["reflect"].split(" | ")[3].startswith("0.0")
    assert rows["reflect"].split(" | ")[4].strip(" |") == "50.0"


def test_balanced_accuracy_by_hand():
    truth = [True, True, True, False, False, False, False, False]
    said = [True, False, False, False, False, True, False, False]
    got = balanced_accuracy(truth, said)
    assert (got["tp"], got["fn"], got["fp"], got["tn"]) == (1, 2, 1, 4)
    assert got["balanced_accuracy"] == pytest.approx((1 / 3 + 4 / 5) / 2)
    assert math.isnan(balanced_accuracy([False, False], [True, False])["tpr"])


def test_ranking_auc_by_hand():
    # 2 Unsafe x 2 Safe pairs: 3 ranked right, 1 wrong
    assert ranking_auc([True, True, False, False], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    assert ranking_auc([True, False], [0.2, 0.8]) == pytest.approx(0.0)
    assert ranking_auc([False, False], [0.2, 0.8]) is None
    assert ranking_auc([True, False], [None, 0.8]) is None


def test_posttrain_report_from_stored_answers(tmp_path):
    """analyse() on answers stored as the suite stores them: ASR by both judges equals the
    judges' verdicts counted by hand; guarded short-circuits are refusals with their cause;
    the McNemar pair counts the discordant prompts."""
    from megatron_srp.evaluation.compliance import ComplianceJudge
    from megatron_srp.evaluation.posttrain_report import analyse, side_by_side
    from megatron_srp.evaluation.stage_units import benchmark_items
    from megatron_srp.units import Units

    data = yaml.safe_load(CONFIG.read_text())
    data["out_dir"] = str(tmp_path / "suite")
    data["benchmarks"] = [{"name": "jailbreakbench", "limit": 6}, {"name": "xstest", "limit": 4}]
    cfg_path = tmp_path / "suite.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    cfg = load_suite_config(cfg_path)
    hand = [json.loads(line) for line in (REPO / "docs/results/real-model/hand_labels.jsonl")
            .read_text().splitlines()]
    texts = [r["answer"] for r in hand[:6]]
    store = Units(Path(cfg.out_dir) / "answers")

    def rows(items, answers):
        return {"samples_per_prompt": 1, "answers": [
            {"id": b.id, "answers": [a]} for b, a in zip(items, answers)]}

    for bench in ("jailbreakbench", "xstest"):
        items = benchmark_items(bench, None, 6 if bench == "jailbreakbench" else 4, None)
        plain = [{"text": texts[i % 6], "short_circuited": False} for i in range(len(items))]
        guarded = [dict(a) for a in plain]
        guarded[0] = {"text": "I cannot help.", "short_circuited": True, "refusal_cause": "unsafe"}
        guarded[1] = {"text": "I cannot help.", "short_circuited": True,
                      "refusal_cause": "malformed"}
        store.put(f"import/asr-{bench}", "x", {"greedy": rows(items, plain)})
        store.put(f"reflect/asr-{bench}", "x", {"greedy": rows(items, plain),
                                                "guarded": rows(items, guarded)})
    res = analyse(cfg, [("reflect", "guarded", "import", "greedy")])
    items = benchmark_items("jailbreakbench", None, 6, None)
    want = [v.harmful for v in ComplianceJudge().judge([b.prompt for b in items], texts)]
    got = res["asr"]["import/greedy"]["jailbreakbench"]["compliance"]["asr"]
    assert got == pytest.approx(sum(want) / 6)
    guarded = res["asr"]["reflect/guarded"]["jailbreakbench"]["compliance"]["asr"]
    assert guarded == pytest.approx(sum(want[2:]) / 6)
    pair = next(p for p in res["pairs"] if p["judge"] == "compliance")
    assert (pair["a_only"], pair["b_only"]) == (0, sum(want[:2]))
    assert res["causes"]["reflect/guarded"]["jailbreakbench"] == {"unsafe": 1, "malformed": 1,
                                                                  "unread": 0}
    shares = res["harmless"]["reflect/guarded"]["xstest"]
    assert shares["n"] == 4 and shares["counts"]["short_circuit"] == 2
    shown = side_by_side(cfg, "jailbreakbench", 2, width=40)
    assert [r["prompt"] for r in shown] == [b.prompt for b in items[:2]]
    assert sorted(shown[0]["answers"]) == ["import/greedy", "reflect/greedy", "reflect/guarded"]
    assert shown[0]["answers"]["reflect/guarded"] == "[refused: unsafe] I cannot help."
    assert shown[1]["answers"]["reflect/guarded"].startswith("[refused: malformed]")
    first = " ".join(texts[0].split())
    assert shown[0]["answers"]["import/greedy"] == first[:40] + ("..." if len(first) > 40 else "")
