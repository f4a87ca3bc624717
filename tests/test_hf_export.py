"""Hugging Face export: a checkpoint trained with TP=2 (untied embeddings) or PP=2 (tied)
loads with transformers' LlamaForCausalLM and gives the Megatron model's logits, and its
tokenizer encodes and decodes like ours, reflection markers included."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megatron_srp.training.launch import REPO_ROOT, TINY, run_pretrain

TEXT = "ROMEO: What light through yonder window breaks?\n<|reflect|>Safe<|/reflect|> It is"


def _train(shakespeare_dataset, out, *layout):
    run_pretrain(2, [*TINY, f"data.paths=[{shakespeare_dataset}]", f"checkpoint.save={out}",
                     "train.train_iters=3", "train.warmup_iters=1", *layout])
    return out


@pytest.fixture(scope="module")
def tp2_untied(shakespeare_dataset, tmp_path_factory):
    return _train(shakespeare_dataset, tmp_path_factory.mktemp("tp2-untied"),
                  "parallel.tensor_model_parallel_size=2", "model.tie_embeddings=false")


@pytest.fixture(scope="module")
def pp2_tied(shakespeare_dataset, tmp_path_factory):
    return _train(shakespeare_dataset, tmp_path_factory.mktemp("pp2-tied"),
                  "parallel.pipeline_model_parallel_size=2")


def _logits_megatron_and_hf(run_dir, export_dir):
    """Runs in a child process: Megatron's process group and transformers stay out of the
    test process."""
    code = f"""
import json, sys, torch
from transformers import AutoTokenizer, LlamaForCausalLM
from megatron_srp.inference.sample import _logits, load_for_inference, shutdown
model, tok, cfg = load_for_inference({str(run_dir)!r})
hf = LlamaForCausalLM.from_pretrained({str(export_dir)!r}).eval()
hf_tok = AutoTokenizer.from_pretrained({str(export_dir)!r})
ids = tok.tokenize({TEXT!r})
x = torch.tensor([ids])
with torch.no_grad():
    a, b = _logits(model, x, tok.vocab_size), hf(x).logits
shutdown()
print("RESULT " + json.dumps({{"same_ids": hf_tok({TEXT!r})["input_ids"] == ids,
    "decoded": hf_tok.decode(ids), "max_diff": (a - b).abs().max().item(),
    "scale": a.abs().max().item(), "eos": hf_tok.eos_token_id, "eod": tok.eod,
    "argmax_equal": bool((a.argmax(-1) == b.argmax(-1)).all())}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _export(run_dir, out, *extra):
    return subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(run_dir),
                           "--out", str(out), *extra], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)


# The PP=2 case is slow (a training run of its own, about a minute), so it runs in make
# test-all only; tied embeddings are exported in the default suite by tests/test_hf_import.py
# (the export of an import has the original tensors).
@pytest.mark.parametrize("layout", ["tp2_untied",
                                    pytest.param("pp2_tied", marks=pytest.mark.slow)])
def test_export_gives_the_same_logits_and_tokens(layout, request, tmp_path):
    run_dir = request.getfixturevalue(layout)
    done = _export(run_dir, tmp_path / "hf", "--dtype", "float32")
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] == ("untied" not in run_dir.name)
    got = _logits_megatron_and_hf(run_dir, tmp_path / "hf")
    assert got["same_ids"] and got["decoded"] == TEXT
    assert got["eos"] == got["eod"]
    assert got["scale"] > 1.0 and got["max_diff"] < 1e-4 * got["scale"], got
    assert got["argmax_equal"]


def test_a_wrong_mapping_would_be_caught(tp2_untied, tmp_path):
    """The logit check has teeth: swapping the SwiGLU gate and up halves breaks it."""
    from safetensors.torch import load_file, save_file

    assert _export(tp2_untied, tmp_path / "hf", "--dtype", "float32").returncode == 0
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith("gate_proj.weight")]:
        up = key.replace("gate_proj", "up_proj")
        tensors[key], tensors[up] = tensors[up], tensors[key]
    save_file(tensors, str(path), metadata={"format": "pt"})
    got = _logits_megatron_and_hf(tp2_untied, tmp_path / "hf")
    assert got["max_diff"] > 1e-2, got


def test_bf16_export_refuses_to_overwrite_and_fails_clearly(tp2_untied, tmp_path):
    from safetensors import safe_open

    assert _export(tp2_untied, tmp_path / "hf").returncode == 0
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    again = _export(tp2_untied, tmp_path / "hf")
    assert again.returncode == 2 and "exists; pass" in again.stderr
    missing = _export(tmp_path / "no-such-run", tmp_path / "other")
    assert missing.returncode == 2 and "no-such-run" in missing.stderr
    assert not (tmp_path / "other").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
