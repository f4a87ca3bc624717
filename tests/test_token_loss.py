"""megatron_srp.evaluation.token_loss: which tokens count as reflection tokens, and that the
windowed loss predicts every token once and sums like the direct computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_srp.evaluation.token_loss import (BODY, EOD, OPEN, TEXT, token_kinds, token_losses,
                                                windows)

OPEN_ID, CLOSE_ID, EOD_ID, V = 7, 8, 0, 10


def test_token_kinds_marks_opener_body_and_closer():
    ids = [0, 3, 4, OPEN_ID, 5, 6, CLOSE_ID, 2, 0, OPEN_ID, 1]
    assert token_kinds(ids, OPEN_ID, CLOSE_ID, EOD_ID).tolist() == [
        EOD, TEXT, TEXT, OPEN, BODY, BODY, BODY, TEXT, EOD, OPEN, BODY]


@pytest.mark.parametrize("window", [1, 3, 5, 64])
def test_windows_predict_every_token_once(window):
    ids = list(range(12))
    targets = [t for p in windows(ids, window) for t in p[1:]]
    assert targets == ids[1:]


def _bigram(table: torch.Tensor):
    return lambda ids: table[ids]


def test_losses_by_kind_equal_the_direct_computation():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(V, V, generator=gen) * 3
    docs = [[3, 4, OPEN_ID, 5, CLOSE_ID, 2, 1, 1, 3, OPEN_ID, 6, CLOSE_ID, 4],
            [2, 2, 9], [OPEN_ID, 5, CLOSE_ID]]
    expected = {"text": [], "reflection_open": [], "reflection_body": []}
    for doc in docs:
        ids = [EOD_ID] + doc
        nll = F.cross_entropy(table[torch.tensor(ids[:-1])], torch.tensor(ids[1:]),
                              reduction="none").tolist()
        kinds = token_kinds(ids, OPEN_ID, CLOSE_ID, EOD_ID)[1:]
        for value, kind in zip(nll, kinds):
            name = {TEXT: "text", OPEN: "reflection_open", BODY: "reflection_body"}[int(kind)]
            expected[name].append(value)
    for window, batch in [(2, 1), (4, 3), (64, 2)]:
        got = token_losses(_bigram(table), docs, open_id=OPEN_ID, close_id=CLOSE_ID,
                           eod_id=EOD_ID, window=window, batch_size=batch)
        assert got.documents == 3
        for name, values in expected.items():
            assert got.counts[name] == len(values), (window, name)
            assert got.mean(name) == pytest.approx(sum(values) / len(values), rel=1e-5)
        assert got.counts["reflection"] == len(expected["reflection_open"]) + len(
            expected["reflection_body"])
        assert got.counts["eod"] == 0


def test_a_model_that_knows_the_reflections_has_a_lower_reflection_loss():
    """Uniform logits give log(V) everywhere; a table that predicts what follows the opener
    lowers only the reflection-body loss."""
    docs = [[3, OPEN_ID, 5, CLOSE_ID, 2]]
    uniform = token_losses(lambda ids: torch.zeros(*ids.shape, V), docs, open_id=OPEN_ID,
                           close_id=CLOSE_ID, eod_id=EOD_ID, window=8)
    for kind in ("text", "reflection_open", "reflection_body"):
        assert uniform.mean(kind) == pytest.approx(math.log(V))
    table = torch.zeros(V, V)
    table[OPEN_ID, 5] = table[5, CLOSE_ID] = 20.0
    knows = token_losses(_bigram(table), docs, open_id=OPEN_ID, close_id=CLOSE_ID,
                         eod_id=EOD_ID, window=8)
    assert knows.mean("reflection_body") < 1e-6
    assert knows.mean("text") == pytest.approx(math.log(V))
    assert np.isclose(knows.mean("reflection_open"), math.log(V))
