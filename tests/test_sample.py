"""Sampling from a really trained checkpoint: loading, determinism, seeds, and proof of weights.

A tiny model is trained once per module with torchrun (2 ranks, DP=2) on a slice of
tinyshakespeare; the checks then run in a subprocess of their own, because Megatron's global
parallel state makes reusing a process fragile. Perplexity is measured on held-out text (the
end of the file, which the slice leaves out), against a freshly initialised model.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_srp.data.preprocess import preprocess
from megatron_srp.inference.sample import (GenerationConfig, filter_logits, generate,
                                           generate_ids, load_for_inference)
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir
from megatron_srp.training.checkpoint import CheckpointError, resolve_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")

REPO = Path(__file__).resolve().parent.parent
TRAIN_CHARS = 400_000
HELD_OUT_CHARS = 12_000
SEQ_LENGTH = 128


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def trained_run(shared_data: Path, tmp_path_factory) -> dict:
    """A 40-step tiny run on the first 400k characters of tinyshakespeare."""
    tmp = tmp_path_factory.mktemp("sample")
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    (tmp / "train.txt").write_text(text[:TRAIN_CHARS], encoding="utf-8")
    held_out = tmp / "held_out.txt"
    held_out.write_text(text[-HELD_OUT_CHARS:], encoding="utf-8")
    tokenizer = SRPTokenizer.from_dir(default_tokenizer_dir())
    preprocess([tmp / "train.txt"], tmp / "shakespeare", tokenizer, workers=1, progress=False)
    run_dir = tmp / "run"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "tools/pretrain_srp.py", "--config", "examples/tiny_cpu.yaml",
          f"data.paths=[{tmp / 'shakespeare'}]", f"checkpoint.save={run_dir}",
          "train.train_iters=40", f"train.seq_length={SEQ_LENGTH}",
          "train.global_batch_size=16", "train.micro_batch_size=8", "train.warmup_iters=4",
          "train.eval_interval=0", "logging.progress_bar=false"], timeout=300)
    return {"run": run_dir, "held_out": held_out, "tmp": tmp}


CHECKS = r"""
import contextlib, importlib.util, io, json, sys, warnings
warnings.filterwarnings("ignore")
from megatron_srp.inference.sample import (GenerationConfig, fresh_model, generate,
                                           load_for_inference, perplexity)
from megatron_srp.training import checkpoint as ckpt

run_dir, held_out_path = sys.argv[1], sys.argv[2]
model, tok, cfg = load_for_inference(run_dir)
prompts = ["ROMEO:\nWhat say you", "First Citizen:\nBefore we proceed any further, hear", ""]
greedy = GenerationConfig(max_new_tokens=24, temperature=0.0, stop_at_eod=False)
greedy_stop = GenerationConfig(max_new_tokens=24, temperature=0.0, stop_at_eod=True)
sampled = lambda seed: GenerationConfig(max_new_tokens=24, temperature=1.0, top_k=20,
                                        top_p=0.95, seed=seed)
held_out = open(held_out_path, encoding="utf-8").read()
out = {
    "tp_pp_vpp": [cfg.parallel.tensor_model_parallel_size,
                  cfg.parallel.pipeline_model_parallel_size,
                  cfg.parallel.virtual_pipeline_model_parallel_size],
    "context": int(model.max_sequence_length),
    "prompts": prompts,
    "eod_text": tok.detokenize([tok.eod]),
    "greedy_a": generate(model, tok, prompts, greedy),
    "greedy_b": generate(model, tok, prompts, greedy),
    "greedy_alone": generate(model, tok, [prompts[1]], greedy)[0],
    # Row 0 samples from the same stream alone as in a batch (one generator per row).
    "sampled_alone": generate(model, tok, [prompts[0]], sampled(7))[0],
    "greedy_stop": generate(model, tok, prompts, greedy_stop),
    "sampled_a": generate(model, tok, prompts[:2], sampled(7)),
    "sampled_b": generate(model, tok, prompts[:2], sampled(7)),
    "sampled_c": generate(model, tok, prompts[:2], sampled(8)),
    "long_prompt": generate(model, tok, [held_out[:3000]],
                            GenerationConfig(max_new_tokens=8, temperature=0.0,
                                             stop_at_eod=False))[0],
    "long_prompt_tokens": len(tok.tokenize(held_out[:3000])),
    "ppl_trained": perplexity(model, tok, held_out, max_tokens=1024),
}
iter_dir = ckpt.latest_checkpoint(run_dir)
model2, _, _ = load_for_inference(iter_dir)
out["greedy_from_iter_dir"] = generate(model2, tok, prompts, greedy)
out["ppl_from_iter_dir"] = perplexity(model2, tok, held_out, max_tokens=1024)
out["ppl_fresh"] = perplexity(fresh_model(cfg, tok.vocab_size), tok, held_out, max_tokens=1024)

# The command line tool, last: it tears the process group down when it is done.
spec = importlib.util.spec_from_file_location("sample_srp", "tools/sample_srp.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    out["cli_rc"] = cli.main(["--checkpoint", run_dir, "--prompt", "ROMEO:", "--prompt",
                              "JULIET:", "--max-new-tokens", "12", "--temperature", "0"])
out["cli_stdout"] = buf.getvalue()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def checks(trained_run: dict) -> dict:
    proc = _run([sys.executable, "-c", CHECKS, str(trained_run["run"]),
                 str(trained_run["held_out"])], timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_loads_into_one_process_as_tp1_pp1(checks):
    assert checks["tp_pp_vpp"] == [1, 1, None]  # trained with DP=2
    assert checks["context"] == SEQ_LENGTH


def test_greedy_is_deterministic(checks):
    assert checks["greedy_a"] == checks["greedy_b"]
    # A directory of one checkpoint loads the same weights as its run directory.
    assert checks["greedy_from_iter_dir"] == checks["greedy_a"]
    assert checks["ppl_from_iter_dir"] == checks["ppl_trained"]


def test_batching_does_not_change_a_prompts_output(checks):
    """Prompts of different lengths share a right-padded batch; causal attention must keep the
    padding invisible."""
    assert checks["greedy_alone"] == checks["greedy_a"][1]
    assert len(checks["prompts"][0]) < len(checks["prompts"][1])  # row 0 is right-padded
    assert checks["sampled_alone"] == checks["sampled_a"][0]


def test_stop_at_eod_cuts_at_the_first_eod(checks):
    for full, stopped in zip(checks["greedy_a"], checks["greedy_stop"]):
        assert stopped == full.split(checks["eod_text"])[0]


def test_continuations_decode_to_text(checks):
    texts = checks["greedy_a"] + checks["sampled_a"] + checks["sampled_c"]
    assert all(isinstance(t, str) and "\ufffd" not in t for t in texts)
    assert all(checks["greedy_a"][:2]), "greedy without stop_at_eod yields 24 tokens of text"
    assert any(re.search(r"[A-Za-z]{2,}", t) for t in checks["sampled_a"] + checks["sampled_c"])


def test_sampling_is_seeded(checks):
    assert checks["sampled_a"] == checks["sampled_b"]
    assert checks["sampled_a"] != checks["sampled_c"]


def test_prompt_longer_than_the_context_is_truncated(checks):
    assert checks["long_prompt_tokens"] > SEQ_LENGTH
    assert checks["long_prompt"]


def test_trained_weights_are_loaded(checks):
    """40 steps take held-out perplexity far below a fresh model's (about the vocab size)."""
    assert checks["ppl_fresh"] > 2000, checks["ppl_fresh"]
    assert checks["ppl_trained"] < 0.5 * checks["ppl_fresh"], checks


def test_cli_prints_prompts_and_continuations(checks):
    out = checks["cli_stdout"]
    assert checks["cli_rc"] == 0
    assert "iter_0000040" in out and "greedy" in out
    assert "--- sample 1: prompt 'ROMEO:' ---\nROMEO:" in out
    assert "--- sample 2: prompt 'JULIET:' ---\nJULIET:" in out


def _cli_main():
    spec = importlib.util.spec_from_file_location("sample_srp", REPO / "tools" / "sample_srp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    assert _cli_main()(["--checkpoint", str(tmp_path)]) == 2
    assert f"error: no checkpoint in {tmp_path}" in capsys.readouterr().err


# -- no model needed -----------------------------------------------------------------------


def test_no_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_for_inference(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_inference(tmp_path / "missing")
    (tmp_path / "iter_0000010").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_for_inference(tmp_path / "iter_0000010")
    (tmp_path / "iter_0000020.partial").mkdir()
    with pytest.raises(CheckpointError, match="unfinished save"):
        resolve_checkpoint(tmp_path / "iter_0000020.partial")
    (tmp_path / "latest").write_text("iter_0000020\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_for_inference(tmp_path)


def test_a_different_tokenizer_is_refused(tmp_path, tok):
    """When run.json records the tokenizer's fingerprint, the saved tokenizer must match it."""
    tok.save(tmp_path / "tokenizer")
    iter_dir = tmp_path / "iter_0000005"
    iter_dir.mkdir()
    (iter_dir / "run.json").write_text(json.dumps(
        {"progress": {}, "model": {}, "config": {}, "tokenizer": {"fingerprint": "0" * 16}}))
    with pytest.raises(CheckpointError, match="is not the one checkpoint"):
        load_for_inference(iter_dir)


def test_generation_config_is_validated():
    for bad in ({"max_new_tokens": -1}, {"temperature": -0.5}, {"top_k": -1}, {"top_p": 0.0},
                {"top_p": 1.5}):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    assert torch.equal(filter_logits(logits, top_k=2)[0, 2:], torch.tensor([inf, inf]))
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    # top_p 0.7: 0.5 alone is not enough, 0.5 + 0.3 is; the rest goes.
    kept = torch.isfinite(filter_logits(logits, top_p=0.7)[0]).tolist()
    assert kept == [True, True, False, False]
    # The most likely token always survives, and no filter keeps everything.
    assert torch.isfinite(filter_logits(logits, top_p=0.01)[0]).tolist() == [True, False, False,
                                                                              False]
    assert torch.equal(filter_logits(logits), logits)
    # Order in the row does not matter.
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(filter_logits(shuffled, top_p=0.7)[0]).tolist() == [False, True, False,
                                                                               True]


# -- generate() mechanics on a stand-in model ------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> SRPTokenizer:
    return SRPTokenizer.from_dir(default_tokenizer_dir())


class FakeLM(torch.nn.Module):
    """Answers ``rule(tokens)`` [b, s] as the next token at each position, with the padded
    vocabulary ids scoring highest of all: generation must slice them off."""

    def __init__(self, vocab_size: int, context: int, rule=None, table=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.max_sequence_length = context
        self.vocab_size, self.rule, self.table = vocab_size, rule, table
        self.inputs: list[torch.Tensor] = []

    def forward(self, tokens, position_ids, attention_mask):
        assert attention_mask is None and not self.training
        assert torch.equal(position_ids[0], torch.arange(tokens.size(1)))
        self.inputs.append(tokens.clone())
        b, s = tokens.shape
        logits = torch.zeros(b, s, self.vocab_size + 128)
        logits[..., self.vocab_size:] = 1e4
        if self.table is not None:
            logits[..., :self.vocab_size] = self.table[tokens % self.table.size(0)]
        else:
            logits.scatter_(-1, self.rule(tokens).unsqueeze(-1), 50.0)
        return logits


GREEDY = dict(temperature=0.0, stop_at_eod=True)


def test_rows_of_different_lengths_get_their_own_continuations(tok):
    model = FakeLM(tok.vocab_size, 64, rule=lambda t: t + 1).train()
    out = generate_ids(model, tok, [[10], [20, 21, 22, 23], [30, 31]],
                       GenerationConfig(max_new_tokens=3, **GREEDY))
    assert out == [[11, 12, 13], [24, 25, 26], [32, 33, 34]]
    assert model.training, "generation restores the model's mode"


def test_stop_at_eod(tok):
    eod = tok.eod
    rule = lambda t: torch.where(torch.arange(t.size(1)) >= 3, eod, t + 1)  # eod once s >= 4
    model = FakeLM(tok.vocab_size, 64, rule=rule)
    prompts = [[10], [10, 11, 12]]
    assert generate_ids(model, tok, prompts, GenerationConfig(max_new_tokens=6, **GREEDY)) == [
        [11, 12, 13], [13]]
    no_stop = GenerationConfig(max_new_tokens=6, temperature=0.0, stop_at_eod=False)
    assert generate_ids(model, tok, prompts, no_stop) == [
        [11, 12, 13, eod, eod, eod], [13] + [eod] * 5]


def test_context_is_truncated_to_the_model_length(tok):
    model = FakeLM(tok.vocab_size, 4, rule=lambda t: t + 1)
    prompt = list(range(100, 110))
    out = generate_ids(model, tok, [prompt], GenerationConfig(max_new_tokens=3, **GREEDY))
    assert out == [[110, 111, 112]]
    assert model.inputs[0].tolist() == [[106, 107, 108, 109]]
    assert all(x.size(1) == 4 for x in model.inputs)


def test_empty_prompt_starts_a_document(tok):
    model = FakeLM(tok.vocab_size, 16, rule=lambda t: torch.full_like(t, 500))
    assert generate_ids(model, tok, [[]], GenerationConfig(max_new_tokens=2, **GREEDY)) == [
        [500, 500]]
    assert model.inputs[0].tolist() == [[tok.eod]]
    assert generate(model, tok, [], GenerationConfig()) == []
    with pytest.raises(TypeError):
        generate(model, tok, "one string", GenerationConfig())


def test_sampling_filters_and_seeds(tok):
    table = torch.randn(64, tok.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    model = FakeLM(tok.vocab_size, 64, table=table)
    prompts = [[1, 2, 3], [7]]
    greedy = generate_ids(model, tok, prompts, GenerationConfig(max_new_tokens=12, **GREEDY))
    for seed in (0, 1):  # top_k=1 and a tiny nucleus leave only the argmax to sample
        for filt in ({"top_k": 1}, {"top_k": 0, "top_p": 1e-6}):
            gen = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=seed, **filt)
            assert generate_ids(model, tok, prompts, gen) == greedy
    wide = lambda seed: GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=0, seed=seed)
    a = generate_ids(model, tok, prompts, wide(5))
    assert a == generate_ids(model, tok, prompts, wide(5))
    assert a != generate_ids(model, tok, prompts, wide(6))
    assert all(0 <= i < tok.vocab_size for row in a for i in row)
    # Each row has its own generator: a prompt's sample does not depend on the rest of the batch.
    assert generate_ids(model, tok, prompts[:1], wide(5)) == a[:1]
