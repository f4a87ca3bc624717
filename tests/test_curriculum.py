"""The curriculum dataset on real Megatron-Core datasets: exact switch, realised mixture, one
stream per dataset across phases, a pure order, DP-independent batches, and what is logged."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_srp.config import load_config
from megatron_srp.data.curriculum import BlendMonitor
from megatron_srp.data.gpt_data import BatchPlan, build_datasets, microbatches
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

STEPS, BATCH = 50, 8  # 400 samples of 128 tokens


@pytest.fixture(scope="module")
def tok() -> SRPTokenizer:
    return SRPTokenizer.from_dir(default_tokenizer_dir())


@pytest.fixture(scope="module")
def wiki_dataset(shared_data, tok, tmp_path_factory) -> str:
    from megatron_srp.data.preprocess import preprocess

    prefix = tmp_path_factory.mktemp("wiki") / "wiki"
    preprocess([shared_data / "wikitext2" / "test.txt"], prefix, tok, progress=False)
    return str(prefix)


def _cfg(*overrides: str):
    return load_config(None, [f"train.train_iters={STEPS}", f"train.global_batch_size={BATCH}",
                              "train.micro_batch_size=2", "train.seq_length=128", *overrides])


def _curriculum(safe: str, other: str, until: float = 0.3, other_weight: float = 1.0) -> str:
    return (f"data.curriculum=[{{until: {until}, blend: {{{safe}: 1.0}}}}, "
            f"{{until: 1.0, blend: {{{safe}: 1.0, {other}: {other_weight}}}}}]")


@pytest.fixture(scope="module")
def curriculum(shakespeare_dataset, wiki_dataset, tok):
    train, _ = build_datasets(_cfg(_curriculum(shakespeare_dataset, wiki_dataset)), tok, None)
    return train


def test_the_switch_happens_at_the_exact_sample(curriculum):
    n = STEPS * BATCH
    switch = int(np.ceil(0.3 * n))  # 120: sample 120 starts exactly at 30% of the tokens
    assert len(curriculum) == n
    assert curriculum.phase_of(switch - 1) == 0 and curriculum.phase_of(switch) == 1
    ids = curriculum.dataset_ids(np.arange(n))
    assert (ids[:switch] == 0).all()  # safe only before the switch
    assert set(ids[switch:switch + 4]) == {0, 1}  # both right after it
    for i in (0, switch - 1, switch, n - 1):  # the index agrees with what is read
        assert curriculum[i]["dataset_id"] == ids[i]
    with pytest.raises(IndexError):
        curriculum.phase_of(n)


def test_realised_mixture_matches_the_weights(shakespeare_dataset, wiki_dataset, tok):
    """Stated bound: after any number i of a phase's samples, each dataset has been drawn
    within 1.5 samples of weight x i (Megatron's exhaustive blending keeps the running error
    this small), and each phase's total is exact to the rounding of weight x size."""
    cfg = _cfg(_curriculum(shakespeare_dataset, wiki_dataset, until=0.2, other_weight=3.0))
    train, _ = build_datasets(cfg, tok, None)
    for plan in train.plans:
        ids = train.dataset_ids(np.arange(plan.start, plan.end))
        for prefix, share in plan.shares().items():
            d = train.prefixes.index(prefix)
            assert (ids == d).sum() == plan.counts[prefix]
            running = np.cumsum(ids == d)
            expected_weight = cfg.data.curriculum[plan.index].blend[prefix] / sum(
                cfg.data.curriculum[plan.index].blend.values())
            assert abs(share - expected_weight) <= 1 / plan.size
            drift = np.abs(running - expected_weight * np.arange(1, plan.size + 1))
            assert drift.max() <= 1.5, (prefix, drift.max())


def test_a_dataset_is_one_stream_across_phases(curriculum):
    """Phase 1 continues the safe dataset where phase 0 stopped: nothing repeats early."""
    first, second = curriculum.phases
    safe_slice = second.datasets[0]  # the safe dataset comes first in both blends
    assert safe_slice.offset == curriculum.plans[0].counts[curriculum.prefixes[0]]
    safe = [i for i in range(len(curriculum)) if curriculum.dataset_ids([i])[0] == 0]
    seen = {curriculum[i]["tokens"].numpy().tobytes() for i in safe}
    assert len(seen) == len(safe)
    source = first.datasets[0].source  # the safe GPTDataset: global sample -> its own index
    np.testing.assert_array_equal(curriculum[safe[len(safe) // 2]]["tokens"],
                                  source[len(safe) // 2]["tokens"])


def test_the_order_is_a_pure_function_of_config_and_seed(shakespeare_dataset, wiki_dataset, tok,
                                                         curriculum):
    again, _ = build_datasets(_cfg(_curriculum(shakespeare_dataset, wiki_dataset)), tok, None)
    picks = [0, 7, 119, 120, 121, 250, 399]
    for i in picks:
        np.testing.assert_array_equal(again[i]["tokens"], curriculum[i]["tokens"])
    other_seed, _ = build_datasets(_cfg(_curriculum(shakespeare_dataset, wiki_dataset),
                                        "train.seed=7"), tok, None)
    assert any(not np.array_equal(other_seed[i]["tokens"], curriculum[i]["tokens"])
               for i in picks)


def test_plain_single_dataset_reads_megatrons_gpt_dataset(shakespeare_dataset, tok):
    """A one-path blend is the one-phase curriculum and reads GPTDataset's own order."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_srp.data.gpt_data import dataset_config

    cfg = _cfg(f"data.paths=[{shakespeare_dataset}]")
    train, valid = build_datasets(cfg, tok, None)
    plain, plain_valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [STEPS * BATCH, len(valid), 0], lambda: True,
        dataset_config(cfg, tok, None)).build()
    for i in (0, 1, 200, STEPS * BATCH - 1):
        np.testing.assert_array_equal(train[i]["tokens"], plain[i]["tokens"])
    np.testing.assert_array_equal(valid[3]["tokens"], plain_valid[3]["tokens"])


def test_dp1_and_dp2_read_the_same_global_sequence(curriculum):
    for step in (14, 15, 16):  # around the switch at sample 120 (step 15)
        one = [b["tokens"] for b in microbatches(curriculum, BatchPlan(BATCH, 2, 1, 0), step)]
        ranks = [[b["tokens"] for b in microbatches(curriculum, BatchPlan(BATCH, 2, 2, r), step)]
                 for r in (0, 1)]
        # micro step m: rank 0 holds the first half of DP=1's two micro batches, rank 1 the rest
        two = [t for m in range(2) for r in (0, 1) for t in ranks[r][m]]
        np.testing.assert_array_equal(np.stack(two), np.concatenate(one))


def test_monitor_logs_phase_blend_and_one_line_per_switch(curriculum):
    monitor = BlendMonitor(curriculum, window=40, consumed=0)
    messages = []
    for step in range(STEPS):
        messages += monitor.advance(step * BATCH, BATCH)
        if step == 14:
            assert monitor.metrics() == {"phase": 0.0, "blend/shakespeare": 1.0, "blend/wiki": 0.0}
    assert messages == ["curriculum: phase 1 starts at sample 120 (30.0% of the token budget): "
                        "shakespeare 50.0%, wiki 50.0%"]
    metrics = monitor.metrics()
    assert metrics["phase"] == 1.0 and abs(metrics["blend/wiki"] - 0.5) <= 1 / 40
    resumed = BlendMonitor(curriculum, window=40, consumed=STEPS * BATCH)
    assert resumed.metrics() == metrics  # a resumed run reports the same blend


def test_token_matched_curricula_draw_the_same_intervention_samples(
        shakespeare_dataset, wiki_dataset, tok):
    counts = []
    for until in (0.2, 0.6):
        cfg = _cfg(_curriculum(shakespeare_dataset, wiki_dataset, until=until),
                   f"data.match_tokens={{{wiki_dataset}: 0.15}}")
        train, _ = build_datasets(cfg, tok, None)
        counts.append(int((train.dataset_ids(np.arange(len(train))) == 1).sum()))
    assert counts == [round(0.15 * STEPS * BATCH)] * 2
