"""The loss goes down on real text, and the logs carry what an operator needs."""
from __future__ import annotations

import math

from megatron_srp.training.launch import TINY, records, run_pretrain


def test_loss_decreases_on_real_text(shakespeare_dataset, tmp_path):
    run_pretrain(2, [*TINY, f"data.paths=[{shakespeare_dataset}]", f"checkpoint.save={tmp_path}",
                     "train.train_iters=60", "train.eval_interval=30", "train.eval_iters=2"])
    train = records(tmp_path, "train")
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    # Uniform over 8192 tokens is ln(8192) = 9.0; Shakespeare is far more predictable.
    assert first > 8.0
    assert last < first - 2.5, (first, last)
    valid = [r["loss"] for r in records(tmp_path, "valid")]
    assert len(valid) == 2 and valid[1] < valid[0] < 8.0

    logged = [r for r in train if "tokens_per_s" in r]
    assert logged, "no interval record with throughput"
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops_per_device", "step_time_s",
                "data_time_s", "peak_mem_gb"):
        assert key in logged[-1] and math.isfinite(logged[-1][key]), key
    assert logged[-1]["tokens_per_s"] > 0
    assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
