"""The curriculum benchmark measures what it says: an index of exactly the budget's samples
with the planned counts, its real array sizes, and fetches of the samples the dataset holds."""
from __future__ import annotations

import numpy as np

from megatron_srp.data.bench_curriculum import (
    DEFAULT_PHASES, _underlying, fetch_overhead, index_at_scale, markdown,
)


def test_index_at_a_small_budget():
    results = index_at_scale(2e7, 2048)
    samples = int(2e7 // 2048)
    assert [r["kind"] for r in results] == ["curriculum", "megatron-blend"]
    for r in results:
        assert r["samples"] == samples
        assert r["index_bytes"] == samples * (2 + 8)  # int16 dataset + int64 sample index
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0
    text = markdown(results, None, "header")
    assert f"{samples:,}" in text and "megatron-blend" in text
    assert [p.until for p in DEFAULT_PHASES][-1] == 1.0


def test_fetch_comparison_reads_the_same_samples(shared_data, tmp_path):
    report = fetch_overhead(shared_data, tmp_path, samples=300, repeats=1, seq_length=256)
    assert set(report["us_per_sample"]) == {"megatron-blend", "curriculum-1-phase",
                                            "curriculum-2-phases"}
    assert all(v > 0 for v in report["us_per_sample"].values())
    assert all(v > 0 for v in report["direct_us_per_sample"].values())
    assert report["ratio_to_megatron"]["megatron-blend"] == 1.0
    assert "vs Megatron BlendedDataset" in markdown(None, report, "header")


def test_underlying_reads_are_the_samples_returned(shared_data, tmp_path):
    """The floor really reads what each dataset returns (else the comparison means nothing)."""
    from megatron_srp.config import load_config
    from megatron_srp.data.gpt_data import build_datasets
    from megatron_srp.data.preprocess import preprocess
    from megatron_srp.data.tokenizer import SRPTokenizer, default_tokenizer_dir

    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    a, b = tmp_path / "a", tmp_path / "b"
    preprocess([shared_data / "tinyshakespeare" / "input.txt"], a, tok, progress=False)
    preprocess([shared_data / "wikitext2" / "test.txt"], b, tok, progress=False)
    cfg = load_config(None, ["train.train_iters=20", "train.global_batch_size=8",
                             "train.seq_length=128", "train.micro_batch_size=8",
                             f"data.curriculum=[{{until: 0.5, blend: {{{a}: 1.0}}}}, "
                             f"{{until: 1.0, blend: {{{a}: 1.0, {b}: 3.0}}}}]"])
    train, _ = build_datasets(cfg, tok, None)
    indices = np.array([0, 79, 80, 81, 120, 159])
    for i, (source, j) in zip(indices, _underlying(train, indices)):
        np.testing.assert_array_equal(train[int(i)]["tokens"], source[j]["tokens"])
