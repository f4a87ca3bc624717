"""The curriculum benchmark measures what it says: an index of exactly the budget's samples
with the planned counts, its real array sizes, and fetches of the samples the dataset holds."""
from __future__ import annotations

import json
import queue

import numpy as np
import pytest

from megatron_srp.bench.curriculum import (
    DEFAULT_PHASES, _build_index, _layers_only, _underlying, fetch_overhead, index_at_scale,
    markdown, parse_curriculum,
)
from megatron_srp.config import ConfigError, DataConfig
from megatron_srp.data.curriculum_plan import plan_phases


def test_index_at_a_small_budget():
    results = index_at_scale(2e7, 2048)
    samples = int(2e7 // 2048)
    assert [r["kind"] for r in results] == ["curriculum", "megatron-blend"]
    for r in results:
        assert r["samples"] == samples
        # nbytes of the arrays the child built: int16 dataset index + int64 sample index
        assert r["index_bytes"] == sum(p["index_bytes"] for p in r["phases"]) == samples * 10
        assert r["seconds"] > 0 and r["peak_rss_mb"] >= r["rss_before_mb"] > 0
        assert sum(sum(p["drawn"].values()) for p in r["phases"]) == samples
    cur, megatron = results
    # The phases tile [0, N) and each phase's index draws exactly what the plan asked for.
    plans = plan_phases(DataConfig(curriculum=DEFAULT_PHASES), samples)
    assert [(p["start"], p["end"]) for p in cur["phases"]] == [(p.start, p.end) for p in plans]
    assert cur["phases"][0]["start"] == 0 and cur["phases"][-1]["end"] == samples
    for part, plan in zip(cur["phases"], plans):
        assert part["planned"] == plan.counts and part["drawn"] == plan.counts
        assert part["samples"] == plan.size == sum(plan.counts.values())
    assert list(cur["phases"][0]["drawn"]) == ["safe"]
    assert cur["phases"][1]["drawn"]["reflect"] == round(0.3 * plans[1].size)
    # The baseline draws the last phase's weights over the whole budget.
    drawn = megatron["phases"][0]["drawn"]
    assert abs(drawn["refusal"] / samples - 0.2) < 1e-3
    assert abs(drawn["safe"] / samples - 0.5) < 1e-3
    text = markdown(results, None, "header")
    assert f"{samples:,}" in text and "megatron-blend" in text
    json.dumps(results)  # the report is written as JSON
    assert [p.until for p in DEFAULT_PHASES][-1] == 1.0


def test_custom_curriculum_from_the_command_line():
    phases = parse_curriculum("[{until: 0.5, blend: {a: 1.0}}, {until: 1.0, blend: {a: 1, b: 3}}]")
    assert [p.until for p in phases] == [0.5, 1.0] and phases[1].blend == {"a": 1.0, "b": 3.0}
    out = queue.Queue()  # the child's code, in this process (a spawn costs seconds)
    _build_index("curriculum", phases, 1000, 16, out)
    cur = out.get_nowait()
    assert [p["drawn"] for p in cur["phases"]] == [{"a": 500}, {"a": 125, "b": 375}]
    with pytest.raises(ConfigError):
        parse_curriculum("[{until: soon, blend: {a: 1.0}}]")


def test_fetch_comparison_reads_the_same_samples(shared_data, tmp_path):
    report = fetch_overhead(shared_data, tmp_path, samples=300, repeats=1, seq_length=256)
    assert set(report["us_per_sample"]) == {"megatron-blend", "curriculum-1-phase",
                                            "curriculum-2-phases"}
    assert report["samples"] == 300
    assert all(v > 0 for v in report["us_per_sample"].values())
    assert all(v > 0 for v in report["direct_us_per_sample"].values())
    assert report["ratio_to_megatron"]["megatron-blend"] == pytest.approx(1.0)
    assert report["raw_ratio_to_megatron"]["megatron-blend"] == pytest.approx(1.0)
    assert report["layers_ratio_to_megatron"]["megatron-blend"] == pytest.approx(1.0)
    # the layers alone are timed for every dataset (how they compare with a real read is the
    # benchmark's business, not a test's: timings on a loaded machine vary)
    assert all(report["layers_us_per_sample"][n] > 0 for n in report["us_per_sample"])
    assert len(report["all_seconds"]) == 9  # fetch, direct, layers x three datasets
    text = markdown(None, report, "header")
    assert "| curriculum-2-phases |" in text and "Goal (fetch within 10%" in text
    with pytest.raises(ValueError):
        fetch_overhead(shared_data, tmp_path, samples=10, repeats=1, order="backwards")


def test_underlying_reads_are_the_samples_returned(shared_data, tmp_path):
    """The floor really reads what each dataset returns (else the comparison means nothing),
    and the curriculum reads each dataset as one stream across the switch."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_srp.config import load_config
    from megatron_srp.data.gpt_data import build_datasets
    from megatron_srp.data.preprocess import preprocess
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    a, b = tmp_path / "a", tmp_path / "b"
    preprocess([shared_data / "tinyshakespeare" / "input.txt"], a, tok, progress=False)
    preprocess([shared_data / "wikitext2" / "test.txt"], b, tok, progress=False)
    cfg = load_config(None, ["train.train_iters=20", "train.global_batch_size=8",
                             "train.seq_length=128", "train.micro_batch_size=8",
                             f"data.curriculum=[{{until: 0.5, blend: {{{a}: 1.0}}}}, "
                             f"{{until: 1.0, blend: {{{a}: 1.0, {b}: 3.0}}}}]"])
    train, _ = build_datasets(cfg, tok, None)
    indices = np.arange(len(train))
    reads = _underlying(train, indices)
    for i, (source, j) in zip(indices, reads):
        np.testing.assert_array_equal(train[int(i)]["tokens"], source[j]["tokens"])
    # The layers-only copy walks the same blend: same dataset behind every index.
    constant = _layers_only(train, {"tokens": np.zeros(1)})
    assert [constant[int(i)]["dataset_id"] for i in indices] == \
        [int(train[int(i)]["dataset_id"]) for i in indices]
    a_reads = [j for source, j in reads if source.dataset_path == str(a)]
    assert a_reads == list(range(80 + 20))  # 80 in phase 0, then a quarter of phase 1's 80
    # ... and a sample's tokens are really the corpus's: its first document's tokens in order.
    raw = IndexedDataset(str(a))
    source, j = reads[0]
    doc, offset = source.sample_index[source.shuffle_index[j]]
    text = raw[int(source.document_index[doc])][int(offset):]
    n = min(len(text), 128)
    np.testing.assert_array_equal(train[0]["tokens"][:n], text[:n])
