"""KV-cache generation, beam search, SafeBeam and reflection-guarded decoding on a real
Megatron model (tests/_inference_child.py runs the checks in a process of its own)."""
from __future__ import annotations

import pytest

from megatron_srp.inference.beam import BeamConfig, SafeBeamConfig
from megatron_srp.inference.guarded import GuardConfig


@pytest.fixture(scope="module")
def checks(inference_checks) -> dict:
    return inference_checks


def test_kv_cache_logits_match_recomputation(checks):
    # Left-padded prefill, single steps, an appended chunk and reordered/repeated rows.
    for stage, err in checks["kv"].items():
        assert err < 1e-5, (stage, err)


@pytest.mark.parametrize("case", ["greedy", "topk", "topp", "eod"])
def test_cached_sampling_draws_what_the_reference_sampler_draws(checks, case):
    result = checks["sampling"][case]
    assert result["same"], result
    if case == "eod":
        assert all(result["stops"]) and len(set(result["lengths"])) > 1, result


def test_beam_search(checks):
    beam = checks["beam"]
    assert beam["one_beam_is_greedy"]
    assert beam["exhaustive"]["beam"] == beam["exhaustive"]["brute"]
    assert beam["exhaustive"]["score_err"] < 1e-4
    assert max(beam["score_errors"]) < 1e-4
    assert beam["batch_equals_alone"]


def test_safebeam_avoids_tokens_the_tag_follows_and_never_returns_a_pruned_beam(checks):
    sb = checks["safebeam"]
    # Plain beam search walks into the trigger, the tag follows, the answer is short-circuited.
    assert all(r["trigger"] and r["finish"] == "tag" for r in sb["plain"])
    assert all(r["text"] == sb["safe_completion"] for r in sb["plain"])
    # SafeBeam prunes every trigger candidate and answers without it.
    assert all(not r["trigger"] and r["finish"] == "length" for r in sb["safe"])
    assert sb["pruned_count"] > 0 and sb["returned_prefixes_pruned"] == 0
    assert sb["no_pruning_equals_beam"]


def test_a_sampled_tag_short_circuits(checks):
    assert all(r["finish"] == "tag" and r["short"] and
               r["text"] == checks["safebeam"]["safe_completion"]
               for r in checks["safebeam"]["sampled_tag"])


def test_guarded_decoding_reflects_at_every_boundary_and_at_the_end(checks):
    never = checks["guarded"]["never"]
    assert never["finish"] == "length" and never["n_ids"] == 20
    assert never["after"] == [5, 10, 15, 20] and all(never["verdicts"])
    assert never["text"] == " word" * 20  # the reflections stay out of the answer
    assert never["summary"]["fired"] == 0 and never["summary"]["reflections_read"] == 4


def test_guarded_decoding_stops_exactly_when_the_model_reads_unsafe(checks):
    fires = checks["guarded"]["fires"]
    # The second reflection (after 10 answer tokens) opens past the Unsafe threshold.
    assert fires["finish"] == "reflection" and fires["n_ids"] == 10
    assert fires["verdicts"] == [True, False] and fires["after"] == [5, 10]
    assert fires["text"] == checks["safebeam"]["safe_completion"]
    assert fires["summary"]["fired"] == 1 and fires["summary"]["fired_rate"] == 1.0


def test_guarded_decoding_refuses_on_a_malformed_reflection_unless_told_to_fail_open(checks):
    closed, open_ = checks["guarded"]["malformed"], checks["guarded"]["malformed_open"]
    assert closed["finish"] == "reflection" and closed["short"]
    assert closed["text"] == checks["safebeam"]["safe_completion"]
    assert closed["verdicts"] == [None] and closed["summary"]["malformed_reflections"] == 1
    assert closed["summary"]["fired"] == 1
    assert open_["finish"] == "length" and not open_["short"] and open_["text"] == " word" * 20
    assert open_["verdicts"] == [None] * 4 and open_["summary"]["fired"] == 0


def test_reading_reflections(checks):
    short, long = checks["guarded"]["read"]
    assert short["safe"] is True and short["p_unsafe"] < 0.01
    assert long["safe"] is False and long["p_unsafe"] > 0.99
    parse = checks["guarded"]["parse"]
    assert parse["Safe"]["safe"] is True
    assert parse["Unsafe: S2"] == {"safe": False, "category": "S2", "label": "Unsafe: S2",
                                   "p_unsafe": None}
    assert parse["Unsafe"]["safe"] is False and parse["Unsafe"]["category"] is None
    assert parse["Unsafe: S99"]["safe"] is None and parse["maybe"]["safe"] is None


def test_configs_reject_impossible_settings():
    with pytest.raises(ValueError, match="num_beams"):
        BeamConfig(num_beams=0)
    with pytest.raises(ValueError, match="raise top_n"):
        SafeBeamConfig(num_beams=4, top_n=1, rule="fraction", drop_fraction=0.5)
    with pytest.raises(ValueError, match="drop_fraction"):
        SafeBeamConfig(drop_fraction=1.0)
    with pytest.raises(ValueError, match="boundary"):
        GuardConfig(boundary="paragraph")


def test_reflection_accuracy_scores_the_models_own_reflections(checks):
    ra = checks["reflection_accuracy"]
    # The model reflects Unsafe: S2 on long segments; its Safe label is left malformed, which
    # counts as not flagging.
    assert ra["right"] == {"accuracy": 1.0, "auc": 1.0, "malformed": 3,
                           "category_accuracy_on_flagged": 1.0}
    assert ra["wrong"] == {"accuracy": 0.0, "auc": 0.0}
    # Few-shot: a model that always answers " Unsafe" flags everything.
    assert ra["few_shot"] == {"accuracy": 0.5, "n": 6, "shots": 2}
    assert ra["few_shot_unsafe_recall"] == 1.0
