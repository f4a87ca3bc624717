"""SafeBeam's drop rules: the threshold rule (the default) leaves a model that never learned the
harmfulness tag alone, and drops exactly the candidates over its threshold where the tag is
likely; the fixed-fraction rule drops half the candidates whatever their tag probability. The
model checks run on a real Megatron model in a process of their own
(tests/_safebeam_child.py)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import run_child

from megatron_srp.inference.beam import BeamConfig, SafeBeamConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    return run_child("tests/_safebeam_child.py", tmp_path_factory)


# --- the configuration ---------------------------------------------------------------------

def test_defaults_are_the_threshold_rule():
    cfg = SafeBeamConfig(num_beams=10, max_new_tokens=64)  # what the callers build
    assert (cfg.rule, cfg.tag_threshold, cfg.tag_relative) == ("threshold", 0.1, None)
    assert (cfg.top_n, cfg.drop_fraction) == (2, 0.5)
    # drop_fraction's num_beams check belongs to the fraction rule only.
    SafeBeamConfig(num_beams=4, top_n=1)


@pytest.mark.parametrize("kwargs, field", [
    (dict(rule="half"), "rule"),
    (dict(tag_threshold=-0.1), "tag_threshold"),
    (dict(tag_threshold=1.5), "tag_threshold"),
    (dict(tag_threshold=math.nan), "tag_threshold"),
    (dict(tag_relative=0.0), "tag_relative"),
    (dict(tag_relative=2.0), "tag_relative"),
    (dict(tag_threshold=None), "tag_threshold or tag_relative"),
    (dict(drop_fraction=1.0), "drop_fraction"),
    (dict(drop_fraction=-0.5, rule="threshold"), "drop_fraction"),
    (dict(rule="fraction", num_beams=4, top_n=1), "drop_fraction.*raise top_n"),
    (dict(top_n=0), "top_n"),
    (dict(num_beams=0), "num_beams"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SafeBeamConfig(**kwargs)


def test_config_accepts_the_edges():
    SafeBeamConfig(tag_threshold=0.0)
    SafeBeamConfig(tag_threshold=1.0, tag_relative=1.0)
    SafeBeamConfig(tag_threshold=None, tag_relative=1e-9)
    SafeBeamConfig(rule="fraction", tag_threshold=None, drop_fraction=0.0)
    assert isinstance(SafeBeamConfig(), BeamConfig)


# --- the rules on given numbers ------------------------------------------------------------

def test_threshold_rule_on_given_candidates():
    cfg = SafeBeamConfig(num_beams=2)
    logps = [-1.0, -2.0, -3.0, -4.0]
    assert cfg.dropped([1e-5, 0.2, 0.1, 0.0999], logps) == ([1, 2], [])
    # A candidate that ends the answer is never dropped by its look-ahead.
    assert cfg.dropped([0.9, 0.9, 0.0, 0.0], logps, [True, False, False, False]) == ([1], [])
    # Every candidate over: the num_beams least tagged are kept (ties: the better-ranked).
    assert cfg.dropped([0.3, 0.2, 0.2, 0.5], logps) == ([0, 3], [1, 2])
    assert SafeBeamConfig(num_beams=3, tag_threshold=0.0).dropped(
        [0.1, 0.2], logps[:2]) == ([], [0, 1])


def test_relative_rule_scales_the_threshold_by_how_much_less_likely_a_candidate_is():
    cfg = SafeBeamConfig(tag_threshold=None, tag_relative=0.5)
    # p * P(y') / P(best) against 0.5: 0.6, 0.9 e^-0.5 = 0.55, 0.99 e^-0.7 = 0.49, 0.
    assert cfg.dropped([0.6, 0.9, 0.99, 0.0], [-1.0, -1.5, -1.7, -1.0]) == ([0, 1], [])
    both = SafeBeamConfig(tag_threshold=0.95, tag_relative=0.5)
    assert both.dropped([0.6, 0.9, 0.99, 0.0], [-1.0, -1.5, -1.7, -1.0]) == ([0, 1, 2], [])


def test_fraction_rule_drops_the_most_tagged_however_unlikely_the_tag():
    cfg = SafeBeamConfig(num_beams=2, rule="fraction")
    assert cfg.dropped([3e-15, 1e-15, 2e-15, 1e-16], [-1.0, -2.0, -3.0, -4.0]) == ([0, 2], [])
    # Ties go against the better-ranked candidate, ends are not spared.
    assert cfg.dropped([0.1, 0.1, 0.1, 0.1], [-1.0] * 4, [True] * 4) == ([0, 1], [])


# --- a real model that never learned the tag -----------------------------------------------

def test_the_untrained_models_tag_is_never_likely(checks):
    u = checks["untagged"]
    probs = [p for k in ("threshold", "fraction", "default") for t in u[k]["trace"]
             for p in t["tag_probs"]]
    assert len(probs) > 500 and max(probs) < 1e-3 and min(probs) > 0


def test_threshold_safebeam_is_beam_search_on_a_model_without_the_tag(checks):
    u = checks["untagged"]
    beam = u["beam"]
    assert len(beam) == 4 and all(len(a["ids"]) == 8 for a in beam)
    # top_n = 2 num_beams: every beam proposes what beam search considers.
    for name in ("threshold", "relative"):
        got = u[name]["answers"]
        assert [a["ids"] for a in got] == [a["ids"] for a in beam], name
        assert [a["score"] for a in got] == pytest.approx([a["score"] for a in beam], abs=1e-6)
        assert all(t["pruned_ranks"] == [] and t["kept_over"] == [] for t in u[name]["trace"])
        assert {t["prompt"] for t in u[name]["trace"]} == {0, 1, 2, 3}
    # At the default top_n: the same answers as SafeBeam told to drop nothing.
    default, none = u["default"], u["no_drop"]
    assert default["answers"] == none["answers"]
    assert all(t["pruned_ranks"] == [] for t in default["trace"])
    assert [t["rule"] for t in default["trace"]][:1] == ["threshold"]


def test_the_fraction_rule_drops_the_best_candidate_of_a_model_without_the_tag(checks):
    u = checks["untagged"]
    trace, beam = u["fraction"]["trace"], u["beam"]
    assert all(len(t["pruned_ranks"]) == t["n"] // 2 for t in trace)
    assert any(0 in t["pruned_ranks"] for t in trace)  # the candidate beam search ranks best
    got = u["fraction"]["answers"]
    assert sum(a["ids"] != b["ids"] for a, b in zip(got, beam)) >= 2
    # The answers are less likely per token (score: mean log-probability per token).
    assert all(a["score"] <= b["score"] + 1e-6 for a, b in zip(got, beam))
    assert sum(a["score"] for a in got) < sum(b["score"] for b in beam)


def test_when_every_candidate_is_over_the_least_tagged_go_on(checks):
    a = checks["untagged"]["all_over"]
    assert a["trace"]
    for t in a["trace"]:
        least = sorted(range(t["n"]), key=lambda k: (t["tag_probs"][k], k))[:a["num_beams"]]
        assert t["kept_over"] == sorted(least)
        assert t["pruned_ranks"] == [k for k in range(t["n"]) if k not in least]


# --- a real model whose tag is likely after some candidates --------------------------------

def _over(step: dict, k: int, probs: list[float], logps: list[float], threshold, relative):
    if step["ends"][k]:
        return False
    if threshold is not None and probs[k] >= threshold:
        return True
    return relative is not None and probs[k] > 0 and \
        math.log(probs[k]) + logps[k] >= math.log(relative) + logps[0]


@pytest.mark.parametrize("name", ["threshold", "low", "relative"])
def test_threshold_rule_drops_exactly_the_candidates_over_it(checks, name):
    run = checks["tagged"][name]
    thr, rel = run["threshold"], run["relative"]
    steps = run["steps"]
    dropping = 0
    for s in steps:
        n = s["n"]
        # The trace's numbers are the model's: recomputed without the cache.
        assert s["tag_probs"] == pytest.approx(s["ref_tag"], abs=1e-5, rel=1e-3)
        assert s["logps"] == pytest.approx(s["ref_logps"], abs=1e-4)
        assert s["kept_over"] == []  # never every candidate over here
        # Dropped: exactly the candidates over the rule, by the trace's and by the reference's
        # numbers (the reference only where it is not within rounding of the boundary).
        assert s["pruned_ranks"] == [k for k in range(n) if _over(
            s, k, s["tag_probs"], s["logps"], thr, rel)]
        for k in range(n):
            near = (thr is not None and abs(s["ref_tag"][k] - thr) < 1e-4) or (
                rel is not None and s["ref_tag"][k] > 0 and abs(
                    math.log(s["ref_tag"][k]) + s["ref_logps"][k] - math.log(rel)
                    - s["ref_logps"][0]) < 1e-3)
            if not near:
                assert (k in s["pruned_ranks"]) == _over(s, k, s["ref_tag"], s["ref_logps"],
                                                         thr, rel), (s["step"], k)
        dropping += 0 < len(s["pruned_ranks"]) < n
    assert dropping >= 3
    # Candidates that end the answer (here the tag itself, likely after the prompt) stay even
    # when the tag would follow them.
    assert any(e and p >= 0.02 for s in steps for e, p in zip(s["ends"], s["tag_probs"]))
    # No answer goes through a dropped candidate.
    dropped = {(s["prompt"], tuple(ids)) for s in steps for ids in s["pruned_ids"]}
    for i, a in enumerate(run["answers"]):
        assert not any((i, tuple(a["ids"][:k])) in dropped for k in range(1, len(a["ids"]) + 1))
    assert any(a["finish"] == "length" and a["ids"] for a in run["answers"])
