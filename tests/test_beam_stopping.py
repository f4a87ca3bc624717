"""Beam search stops only when no live beam can beat the answers that have finished
(tests/_beam_stop_child.py runs the decoding on a real Megatron model)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("beam_stop") / "out.json"
    proc = subprocess.run([sys.executable, "tests/_beam_stop_child.py", str(out)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["beam", "safebeam"])
def test_a_stop_token_that_is_every_steps_second_choice_does_not_end_the_search(decoded,
                                                                               method):
    # The tag is the second choice at every step (about 3%): four tag-ended candidates are
    # among the best four within four steps. Stopping then returned a tag (a refusal); the
    # answer, ten words and the end of the document, scores far better per token.
    assert 0.9 < decoded["p_word"] < 0.99 and 0.01 < decoded["p_tag"] < 0.06, decoded
    for r in decoded[method]:
        assert r["finish"] == "eod" and r["n"] == 10 and r["text"] == " word" * 10, r
