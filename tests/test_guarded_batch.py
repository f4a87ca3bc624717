"""Reflection-guarded decoding gives each prompt what it gives alone, whatever else is in its
batch, and says why it refused (tests/_guarded_batch_child.py runs the decoding)."""
from __future__ import annotations

import pytest
from conftest import run_child

SCENARIOS = ("safe", "unsafe_late", "malformed", "reflect_forever", "fail_open", "plain_model",
             "long_label")


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict:
    return run_child("tests/_guarded_batch_child.py", tmp_path_factory)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_prompt_gets_the_same_guarded_answer_alone_and_in_a_batch(decoded, scenario):
    case = decoded[scenario]
    for i, alone in enumerate(case["alone"]):
        assert case["batch"][i] == alone, (scenario, i)
        assert case["batch_reversed"][i] == alone, (scenario, i)


def test_the_short_prompts_reflection_is_read_beside_a_long_prompt(decoded):
    # The batch is padded to 100 tokens; the short prompt's 40 answer tokens and its
    # reflection fit its own 128-token window, so the reflection is read (Safe) and the answer
    # passes. Sizing the cache by the padded width left no room for it: unread, refused.
    assert decoded["lengths"] == [2, 100, 60] and decoded["window"] == 128
    short = decoded["safe"]["batch"][0]
    assert short["finish"] == "length" and len(short["ids"]) == 40
    assert [r["safe"] for r in short["reflections"]] == [True]
    assert short["refusal_cause"] is None and short["answer_budget"] is None


def test_a_row_without_room_for_its_answer_and_reflection_gets_a_smaller_budget_first(decoded):
    budget = decoded["reflection_budget"]  # one reflection: opener, label, closer
    long = decoded["safe"]["batch"][1]
    kept = 128 - 40  # a prompt keeps its last (window - max_new_tokens) tokens, as elsewhere
    assert long["answer_budget"] == 128 - kept - budget
    assert len(long["ids"]) == long["answer_budget"] and long["finish"] == "length"
    assert [r["safe"] for r in long["reflections"]] == [True]  # read, not refused
    middle = decoded["safe"]["batch"][2]
    assert middle["answer_budget"] is None and len(middle["ids"]) == 40
    assert decoded["safe"]["summary"]["budget_cut"] == 1


def test_every_refusal_carries_its_cause(decoded):
    late = decoded["unsafe_late"]["batch"]  # Unsafe from position 60 on
    assert late[0]["refusal_cause"] is None and late[0]["finish"] == "length"
    assert [r["refusal_cause"] for r in late[1:]] == ["unsafe", "unsafe"]
    assert decoded["unsafe_late"]["summary"]["refusals_by_cause"] == {
        "unsafe": 2, "malformed": 0, "unread": 0}
    assert {r["refusal_cause"] for r in decoded["malformed"]["batch"]} == {"malformed"}
    forever = decoded["reflect_forever"]["batch"]
    assert all(r["ids"] == [] for r in forever)
    assert "unread" in {r["refusal_cause"] for r in forever}
    for r in forever:
        if r["refusal_cause"] == "unread":
            assert r["reflections"][-1]["missing"] and r["finish"] == "reflection"


def test_failing_open_lets_malformed_reflections_through_with_no_cause(decoded):
    rows = decoded["fail_open"]["batch"]
    assert all(r["refusal_cause"] is None and not r["short_circuited"] for r in rows)
    assert [len(r["ids"]) for r in rows] == [40, 40 - decoded["reflection_budget"], 40]


def test_a_label_longer_than_twelve_tokens_is_read_whole(decoded):
    # "Unsafe: MSW-PRIVACY" is 15 tokens: read whole by default (the taxonomy's longest label),
    # malformed when the label budget is cut to 12
    assert decoded["long_label_tokens"] == 15
    rows = decoded["long_label"]["batch"]
    assert [(r["refusal_cause"], r["category"]) for r in rows] == [("unsafe", "MSW-PRIVACY")] * 3
    assert decoded["long_label_cut"]["batch"][0]["refusal_cause"] == "malformed"
    assert [(r["safe"], r["category"]) for r in decoded["long_label_read"]] == [
        (False, "MSW-PRIVACY")] * 2
