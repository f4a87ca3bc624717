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
