"""Finetuning: starts from the pretrained weights, trains on the answers only (the logged loss
is the masked loss recomputed by hand), runs under TP and PP, resumes exactly, and refuses bad
recipes with the key named."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_srp.config import ConfigError, load_config
from megatron_srp.data.chat import SFTDataset
from megatron_srp.training.finetune import (
    EpochOrder, EpochMonitor, _load_chat, check_finetune, derive_schedule, load_finetune_config,
    pretrained_tokenizer, split_records,
)
from megatron_srp.training.launch import FINETUNE, run_pretrain, train_losses
from megatron_srp.training import checkpoint as ckpt

RECIPE = "examples/finetune/gsm8k.yaml"


def _args(pretrained: Path, data: Path, save: Path, *extra: str) -> list[str]:
    return ["--config", RECIPE, f"finetune.pretrained={pretrained}", f"finetune.data=[{data}]",
            "finetune.max_records=40", "finetune.valid_records=4", f"checkpoint.save={save}",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=1e-3",
            "train.eval_interval=5", "train.eval_iters=1", "logging.log_interval=1",
            "logging.progress_bar=false", *extra]


@pytest.fixture(scope="module")
def gsm8k(shared_data) -> Path:
    return shared_data / "gsm8k" / "train_sample2000.jsonl"


# ---------------------------------------------------------------------------------------------
# The pieces, in process


class _Fake:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_epoch_order_visits_every_sample_once_per_epoch() -> None:
    order = EpochOrder(_Fake(10), seed=3, total=25)
    seen = [order[i] for i in range(25)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # each epoch has its own order
    assert seen == [EpochOrder(_Fake(10), seed=3, total=25)[i] for i in range(25)]
    assert seen != [EpochOrder(_Fake(10), seed=4, total=25)[i] for i in range(25)]


def test_epoch_monitor_announces_each_new_epoch() -> None:
    monitor = EpochMonitor(EpochOrder(_Fake(10), seed=0, total=40), consumed=0)
    assert monitor.advance(0, 8) == []
    assert monitor.advance(8, 8) == ["finetune: epoch 2 starts at sample 10"]
    assert monitor.metrics()["epoch"] == pytest.approx(1.6)
    assert monitor.advance(16, 24) == ["finetune: epoch 3 starts at sample 20",
                                       "finetune: epoch 4 starts at sample 30"]


def test_schedule_comes_from_epochs_and_warmup_fraction() -> None:
    cfg = load_config(None, ["train.global_batch_size=4", "finetune.epochs=2",
                             "finetune.warmup_fraction=0.1"])
    derive_schedule(cfg, train_samples=45)
    assert (cfg.train.train_iters, cfg.train.warmup_iters, cfg.train.lr_decay_iters) == (23, 2, 23)
    cfg.finetune.epochs = 0
    with pytest.raises(ConfigError, match="finetune.epochs"):
        derive_schedule(cfg, 45)


def test_held_out_records_are_disjoint_and_seeded() -> None:
    records = list(range(20))
    train, valid = split_records(records, 5, seed=1)
    assert len(valid) == 5 and sorted(train + valid) == records
    assert split_records(records, 5, seed=1) == (train, valid)
    with pytest.raises(ConfigError, match="finetune.valid_records"):
        split_records(records, 20, seed=1)


def test_bad_recipes_name_the_key(tiny_pretrained, gsm8k, tmp_path) -> None:
    with pytest.raises(ConfigError, match="finetune.pretrained"):
        load_finetune_config(RECIPE, [])
    with pytest.raises(ConfigError, match="finetune.pretrained.*does not exist"):
        load_finetune_config(RECIPE, [f"finetune.pretrained={tmp_path / 'nothing'}"])
    cfg = load_finetune_config(RECIPE, [f"finetune.pretrained={tiny_pretrained}",
                                        f"finetune.data=[{gsm8k},{tmp_path / 'missing.jsonl'}]"])
    with pytest.raises(ConfigError, match=r"finetune.data\[1\]"):
        check_finetune(cfg)
    # A recipe that changes the model shape is refused before any training, naming the field.
    cfg = load_finetune_config(RECIPE, [f"finetune.pretrained={tiny_pretrained}",
                                        f"finetune.data=[{gsm8k}]", "model.num_layers=3",
                                        f"checkpoint.save={tmp_path / 'ft'}"])
    with pytest.raises(ckpt.CheckpointError, match="num_layers"):
        ckpt.check_compatible(check_finetune(cfg), cfg, 50000)


# ---------------------------------------------------------------------------------------------
# Real runs


def _reference_first_loss(pretrained: Path, cfg) -> tuple[float, float]:
    """(masked, unmasked) mean loss of the pretrained model on the run's first global batch,
    averaged over micro batches as the training loop does."""
    from megatron_srp.inference.sample import load_for_inference, shutdown

    tokenizer = pretrained_tokenizer(ckpt.resolve_checkpoint(pretrained))
    train, _, _ = _load_chat(cfg, tokenizer)
    order = EpochOrder(train, cfg.train.seed, 10**6)
    model, _, _ = load_for_inference(pretrained)
    try:
        masked, unmasked = [], []
        mbs = cfg.train.micro_batch_size
        for start in range(0, cfg.train.global_batch_size, mbs):
            items = [order[i] for i in range(start, start + mbs)]
            tokens = torch.as_tensor(np.stack([x["tokens"] for x in items]))
            labels = torch.as_tensor(np.stack([x["labels"] for x in items]))
            mask = torch.as_tensor(np.stack([x["loss_mask"] for x in items]))
            with torch.no_grad():
                loss = model(tokens, torch.as_tensor(np.stack([x["position_ids"] for x in items])),
                             None, labels=labels).float()
            masked.append(float((loss * mask).sum() / mask.sum()))
            real = (tokens != tokenizer.pad).float()
            unmasked.append(float((loss * real).sum() / real.sum()))
    finally:
        shutdown()
    return float(np.mean(masked)), float(np.mean(unmasked))


def test_first_step_loss_is_the_pretrained_models_loss_on_the_answers(
        tiny_pretrained, gsm8k, tmp_path) -> None:
    """Under TP=2 the step-1 loss equals the pretrained model's loss on the answer tokens of
    the first batch, recomputed here in one process: the weights were loaded, and the loss
    mask is applied (the loss over all tokens differs)."""
    args = _args(tiny_pretrained, gsm8k, tmp_path / "ft", "parallel.tensor_model_parallel_size=2")
    run_pretrain(2, args, script=FINETUNE)
    masked, unmasked = _reference_first_loss(tiny_pretrained, load_finetune_config(args[1], args[2:]))
    logged = train_losses(tmp_path / "ft")[1]
    assert logged == pytest.approx(masked, rel=1e-4)
    assert abs(masked - unmasked) > 0.05
    run = json.loads((ckpt.latest_checkpoint(tmp_path / "ft") / "run.json").read_text())
    facts = run["finetune"]
    assert facts["records"] == 40 and 0 < facts["valid_samples"] <= 4
    assert facts["train_samples"] + facts["valid_samples"] + facts["dropped_without_answer"] <= 40
    assert run["config"]["train"]["train_iters"] == -(-facts["train_samples"] // 4)
    # The finetuned run is a checkpoint like any other: it loads for inference.
    from megatron_srp.inference.sample import load_for_inference, shutdown
    load_for_inference(tmp_path / "ft")
    shutdown()


def test_resumed_finetune_matches_uninterrupted_one(tiny_pretrained, gsm8k, tmp_path) -> None:
    """Pipeline-parallel finetune (PP=2), saved every 3 steps; resuming from step 3 replays the
    rest exactly (and does not reload the pretrained weights over the finetuned ones)."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    extra = ("parallel.pipeline_model_parallel_size=2", "checkpoint.save_interval=3",
             "checkpoint.keep_last=10")
    run_pretrain(2, _args(tiny_pretrained, gsm8k, whole, *extra), script=FINETUNE)
    shutil.copytree(whole / "iter_0000003", resumed / "iter_0000003")
    shutil.copytree(whole / "tokenizer", resumed / "tokenizer")
    (resumed / "latest").write_text("iter_0000003\n")
    out = run_pretrain(2, _args(tiny_pretrained, gsm8k, resumed, *extra), script=FINETUNE)
    assert "starting at step 3" in out.stdout
    expected, got = train_losses(whole), train_losses(resumed)
    assert sorted(got) == list(range(4, max(expected) + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"


def test_a_bad_chat_file_fails_before_training(tiny_pretrained, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "no answer"}\n')
    out = run_pretrain(1, _args(tiny_pretrained, bad, tmp_path / "ft", "finetune.prompt_key=prompt",
                                "finetune.response_key=response"), script=FINETUNE, check=False)
    assert out.returncode != 0
    assert f"{bad}:2" in out.stdout and "'response'" in out.stdout
    assert not (tmp_path / "ft" / "latest").exists()


def test_sft_dataset_keeps_short_answers_whole(tiny_pretrained) -> None:
    tokenizer = pretrained_tokenizer(ckpt.resolve_checkpoint(tiny_pretrained))
    ds = SFTDataset([[("user", "Say hi."), ("assistant", "Hi.")]], tokenizer, 128)
    item = ds[0]
    answer = tokenizer.tokenize("Hi.") + [tokenizer.eod]
    assert item["labels"][item["loss_mask"] == 1].tolist() == answer
