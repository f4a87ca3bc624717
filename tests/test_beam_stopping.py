"""Beam search stops only when no live beam can beat the answers that have finished
(tests/_beam_stop_child.py runs the decoding on a real Megatron model)."""
from __future__ import annotations

import pytest
from conftest import run_child



@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict:
    return run_child("tests/_beam_stop_child.py", tmp_path_factory)


@pytest.mark.parametrize("method", ["beam", "safebeam"])
def test_a_stop_token_that_is_every_steps_second_choice_does_not_end_the_search(decoded,
                                                                               method):
    # The tag is the second choice at every step (about 3%): four tag-ended candidates are
    # among the best four within four steps. Stopping then returned a tag (a refusal); the
    # answer, ten words and the end of the document, scores far better per token.
    assert 0.9 < decoded["p_word"] < 0.99 and 0.01 < decoded["p_tag"] < 0.06, decoded
    for r in decoded[method]:
        assert r["finish"] == "eod" and r["n"] == 10 and r["text"] == " word" * 10, r


def test_a_finished_answer_is_normalised_by_its_length_with_the_stop_token():
    # The stop token's log-probability is in the score, so it counts in the length (as in
    # transformers). Dividing by the length without it penalised a finished answer by
    # (n+1)/n: here a 2-token answer (stop included) at -1.0 scores -0.5, not -1.0.
    from megatron_srp.inference.beam import BeamConfig, _choose, _Prompt

    stop, word = 0, 5
    state = _Prompt(beams=[([word], -0.4)], finished=[])
    cfg = BeamConfig(num_beams=1, max_new_tokens=8)
    chosen = _choose(state, [0, 1], [stop, word], [-1.0, -0.8], [[word], [word]], {stop}, cfg,
                     last_step=False)
    assert state.finished == [(-0.5, [word], stop, -1.0)]
    assert chosen == [1] and state.beams == [([word, word], -0.8)]
