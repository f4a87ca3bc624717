"""Hugging Face import: Llama models built here from a ``transformers`` config (random
weights, every norm and matrix drawn, nothing downloaded) imported with tools/import_hf.py give
transformers' logits at TP=1, TP=2 and PP=2, tied and untied, with grouped-query attention and
Llama 3 RoPE scaling; the special tokens the tokenizer lacked get rows at the mean embedding;
export(import(hf)) gives back hf's tensors; and each bad input is a named error that writes
nothing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_srp.tokenizer import TOKENIZER_FILE, default_tokenizer_dir
from megatron_srp.training.launch import REPO_ROOT

CHILD = str(REPO_ROOT / "tests" / "_hf_import_child.py")
SHIPPED_VOCAB = 8192  # the shipped tokenizer, special tokens included
BASE_VOCAB = 8187  # the same without the project's five special tokens
ODD_VOCAB = 1100  # a vocabulary whose padding differs between TP=1 and TP=2


def _plain_tokenizer(dst: Path) -> None:
    """The shipped tokenizer without the project's special tokens, as an HF model's would be;
    the import adds them back at the same ids (so shipped datasets fit the imported model)."""
    data = json.loads((default_tokenizer_dir() / TOKENIZER_FILE).read_text())
    data["added_tokens"] = []
    (dst / TOKENIZER_FILE).write_text(json.dumps(data))


def _word_tokenizer(dst: Path, size: int) -> None:
    """A word-level tokenizer of ``size`` ids: with the five special tokens its vocabulary pads
    to 1,152 rows at TP=1 but 1,280 at TP=2 (multiples of 128 x TP)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dst / TOKENIZER_FILE))


def _hf_model(dst: Path, *, vocab: int, tied: bool, kv_heads: int, seed: int,
              rope_scaling: dict | None = None, shard: bool = False, max_pos: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_pos, rope_theta=50000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=tied, rope_scaling=rope_scaling)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # every weight random, norms too, so any misplaced tensor shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(dst, max_shard_size="200KB" if shard else "5GB")
    return dst


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """tied: GQA 4 heads / 2 KV heads, sharded safetensors, a tokenizer that already has the
    special tokens. untied: 4 heads / 1 KV head, Llama 3 RoPE scaling, a tokenizer without
    them (the import adds five ids). odd: tied, a word-level vocabulary of 1,100 ids."""
    root = tmp_path_factory.mktemp("hf")
    tied = _hf_model(root / "tied", vocab=SHIPPED_VOCAB, tied=True, kv_heads=2, seed=1,
                     shard=True)
    shutil.copy(default_tokenizer_dir() / TOKENIZER_FILE, tied / TOKENIZER_FILE)
    untied = _hf_model(root / "untied", vocab=BASE_VOCAB, tied=False, kv_heads=1, seed=2,
                       max_pos=16384,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})
    _plain_tokenizer(untied)
    odd = _hf_model(root / "odd", vocab=ODD_VOCAB, tied=True, kv_heads=2, seed=3)
    _word_tokenizer(odd, ODD_VOCAB)
    return {"tied": tied, "untied": untied, "odd": odd, "root": root}


def _child(command: str, spec, out: Path, nproc: int = 1) -> object:
    spec_file = out.with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec))
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, CHILD, command, str(spec_file), str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def imported(hf_models):
    """Both models imported (TP=1) and measured: logits, added rows, export round trip."""
    root = hf_models["root"]
    cases = [{"hf": str(hf_models["tied"]), "run": str(root / "run-tied"),
              "hf_vocab": SHIPPED_VOCAB, "export": str(root / "export-tied")},
             {"hf": str(hf_models["untied"]), "run": str(root / "run-untied"),
              "hf_vocab": BASE_VOCAB, "export": str(root / "export-untied")},
             {"hf": str(hf_models["odd"]), "run": str(root / "run-odd"), "hf_vocab": ODD_VOCAB}]
    tied, untied, odd = _child("tp1", cases, root / "tp1.json")
    return {"tied": tied, "untied": untied, "odd": odd}


@pytest.mark.parametrize("case", ["tied", "untied", "odd"])
def test_imported_model_gives_transformers_logits(imported, case):
    got = imported[case]
    assert got["rc"] == 0
    assert got["scale"] > 1.0, got  # logits large enough for the bound to mean something
    assert got["max_diff_old_ids"] <= 1e-4, got
    assert got["argmax_equal"]


def test_config_is_derived_from_config_json(imported):
    tied, untied = imported["tied"]["config_model"], imported["untied"]["config_model"]
    assert tied["preset"] == "custom" and tied["tie_embeddings"] is True
    assert (tied["num_attention_heads"], tied["num_query_groups"]) == (4, 2)
    assert (untied["num_query_groups"], untied["tie_embeddings"]) == (1, False)
    assert untied["rope_scaling_factor"] == 8.0 and tied["rope_scaling_factor"] is None
    assert tied["rotary_base"] == 50000.0 and tied["norm_epsilon"] == 1e-5
    assert tied["ffn_hidden_size"] == 160 and tied["max_position_embeddings"] == 256
    assert imported["tied"]["seq_length"] == 256


def test_special_tokens_are_added_with_rows_at_the_mean(imported):
    tied, untied = imported["tied"], imported["untied"]
    assert tied["new_ids"] == [] and tied["vocab_size"] == SHIPPED_VOCAB
    assert untied["new_ids"] == list(range(BASE_VOCAB, SHIPPED_VOCAB))
    assert untied["special_ids"] == tied["special_ids"]
    # the same ids as the shipped tokenizer: datasets preprocessed with it fit both models
    assert untied["fingerprint"] == tied["fingerprint"]
    assert untied["new_rows_minus_mean"] < 1e-6 and untied["old_rows_equal"]
    reflect = untied["special_ids"]["<|reflect|>"]
    assert reflect in untied["text_ids_with_specials"]  # the marker is one token


def test_export_of_the_import_has_the_original_tensors(imported):
    tied, untied = imported["tied"], imported["untied"]
    assert tied["export_keys_equal"] and tied["export_max_diff"] == 0.0
    assert untied["export_keys_equal"] and untied["export_max_diff"] == 0.0
    # the untied export also carries the five added rows
    assert untied["export_shapes"]["lm_head.weight"] == [SHIPPED_VOCAB, 64]


@pytest.mark.parametrize("case", ["tied", "untied"])
def test_export_and_reimport_keep_the_checkpoints_logits(imported, case):
    """transformers reads the export of an import (RoPE scaling included) with the
    checkpoint's logits, and importing that export again gives them back."""
    got = imported[case]
    assert got["export_logits_diff"] <= 1e-4, got
    assert got["reimport_rc"] == 0 and got["reimport_same_tokenizer"]
    assert got["reimport_logits_diff"] <= 1e-5, got


def test_imported_model_gives_transformers_logits_at_tp2_and_pp2(hf_models, imported):
    """The tied model, and the odd vocabulary whose TP=2 padding differs from the saved one."""
    root = hf_models["root"]
    specs = [{"hf": str(hf_models["tied"]), "run": str(root / "run-tied"),
              "hf_vocab": SHIPPED_VOCAB},
             {"hf": str(hf_models["odd"]), "run": str(root / "run-odd"), "hf_vocab": ODD_VOCAB}]
    got = _child("layouts", specs, root / "layouts.json", nproc=2)
    assert set(got) == {f"{s['run']}/{layout}" for s in specs
                        for layout in ("tp2_pp1", "tp1_pp2")}, got
    for layout, measured in got.items():
        assert measured["scale"] > 1.0 and measured["max_diff"] <= 1e-4, (layout, measured)
    assert imported["odd"]["vocab_size"] == ODD_VOCAB + 5


# ------------------------------------------------------ the export, read by other tools

CONVERSATIONS = [
    [("user", "How do I bake bread?"), ("assistant", "Mix flour, water and yeast.")],
    [("user", "Hi!"), ("assistant", "Hello. <|reflect|>Safe<|/reflect|>"),
     ("user", "What is 2+2?\nAnswer briefly."), ("assistant", " 4")],
]


def test_chat_template_renders_the_finetuning_text(imported, hf_models):
    """apply_chat_template on an export gives exactly the text finetune_srp.py trains on, and
    with add_generation_prompt the prompt up to the first answer token, ids included.
    (finetuning tokenizes each answer on its own, so a whole conversation tokenized at once
    joins the space after "Assistant:" to the answer's first word: the text is the same.)"""
    from transformers import AutoTokenizer

    from megatron_srp.data.chat import encode_chat
    from megatron_srp.tokenizer import SRPTokenizer

    export = hf_models["root"] / "export-tied"
    hf_tok = AutoTokenizer.from_pretrained(export)
    ours = SRPTokenizer.from_dir(export)
    for turns in CONVERSATIONS:
        ids, mask = encode_chat(turns, ours)
        messages = [{"role": r, "content": t} for r, t in turns]
        text = hf_tok.apply_chat_template(messages, tokenize=False)
        assert text == ours.detokenize(ids)
        first_answer = mask.index(1)
        prompt = hf_tok.apply_chat_template(messages[:1], tokenize=False,
                                            add_generation_prompt=True)
        assert prompt == ours.detokenize(ids[:first_answer])
        assert prompt.endswith("\nAssistant: ")
        assert list(hf_tok.apply_chat_template(messages[:1], tokenize=True, return_dict=False,
                                               add_generation_prompt=True)) == ids[:first_answer]
    with pytest.raises(Exception, match="only user and assistant"):
        hf_tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_batched_generation_equals_each_prompt_alone(imported, hf_models):
    """Left padding: greedy generate of two prompts of different lengths in one batch gives
    each prompt's tokens alone (float32); the decoding defaults are sample_srp.py's."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    export = hf_models["root"] / "export-tied"
    tok = AutoTokenizer.from_pretrained(export)
    model = LlamaForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert tok.padding_side == "left"
    prompts = ["ROMEO: What light through yonder window breaks? It is the east,", "JULIET:"]
    assert len(tok(prompts[0])["input_ids"]) > len(tok(prompts[1])["input_ids"]) + 5
    greedy = {"do_sample": False, "max_new_tokens": 8, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        batch = tok(prompts, return_tensors="pt", padding=True)
        together = model.generate(**batch, **greedy)[:, batch["input_ids"].shape[1]:]
        for i, prompt in enumerate(prompts):
            one = tok([prompt], return_tensors="pt")
            alone = model.generate(**one, **greedy)[0, one["input_ids"].shape[1]:]
            assert together[i].tolist() == alone.tolist(), (prompt, together[i], alone)
    defaults = GenerationConfig.from_pretrained(export)
    assert (defaults.do_sample, defaults.top_k, defaults.temperature) == (True, 10, 1.0)
    assert defaults.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids(
        "<|endoftext|>")


# ------------------------------------------------------------------------- bad input


def _import(hf: Path, out: Path) -> int:
    import importlib.util
    spec = importlib.util.spec_from_file_location("import_hf", REPO_ROOT / "tools" /
                                                  "import_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--hf", str(hf), "--out", str(out)])


def _refused(hf: Path, tmp_path: Path, capsys, *needles: str) -> None:
    out = tmp_path / "out"
    assert _import(hf, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_gpt2_config_is_refused_naming_the_supported_families(tmp_path, capsys):
    from transformers import GPT2Config

    hf = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(hf)
    _refused(hf, tmp_path, capsys, "config.json", "model_type 'gpt2'", "'llama'",
             "supported families")


def test_a_missing_weight_is_refused(hf_models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    hf = _copy(hf_models["untied"], tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    _refused(hf, tmp_path, capsys, "missing weight", "model.layers.1.mlp.up_proj.weight")


def test_a_shape_mismatch_is_refused(hf_models, tmp_path, capsys):
    hf = _copy(hf_models["untied"], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] = 192
    (hf / "config.json").write_text(json.dumps(config))
    _refused(hf, tmp_path, capsys, "model.layers.0.mlp.gate_proj.weight", "[160, 64]",
             "[192, 64]")


def test_a_missing_shard_and_a_foreign_tokenizer_are_refused(hf_models, tmp_path, capsys):
    hf = _copy(hf_models["tied"], tmp_path / "hf")
    shard = sorted(hf.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _refused(hf, tmp_path, capsys, shard.name, "does not exist")
    hf2 = _copy(hf_models["untied"], tmp_path / "hf2")  # 8187 rows
    shutil.copy(default_tokenizer_dir() / TOKENIZER_FILE, hf2 / TOKENIZER_FILE)  # 8192 ids
    _refused(hf2, tmp_path, capsys, "tokenizer.json has 8192 ids", "vocab_size is 8187")


# ------------------------------------------------------------- continued pretraining

CONTINUE = ["train.seq_length=128", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.train_iters=8", "train.warmup_iters=2", "train.lr=3e-3",
            "train.eval_interval=0", "logging.log_interval=1", "logging.progress_bar=false",
            "checkpoint.save_interval=4"]


@pytest.fixture(scope="module")
def srp_data(imported, hf_models, shared_data):
    """ToxiGen statements preprocessed into ``srp`` with the imported model's tokenizer (a
    reflection after each statement, from its label)."""
    out = hf_models["root"] / "srp"
    done = subprocess.run(
        [sys.executable, "tools/preprocess_srp.py", "--input",
         str(shared_data / "toxigen" / "toxigen_statements.jsonl"), "--output-dir", str(out),
         "--variant", "srp=reflect:include_category=false", "--classifier", "oracle",
         "--classifier-option", "category_key=none", "--tokenizer",
         str(hf_models["root"] / "run-untied" / "tokenizer"), "--workers", "1", "--no-progress"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return str(out / "srp")


@pytest.fixture(scope="module")
def continued(hf_models, srp_data):
    from megatron_srp.training.launch import run_pretrain

    out = hf_models["root"] / "continued"
    done = run_pretrain(1, [*CONTINUE, f"checkpoint.pretrained={hf_models['root'] / 'run-untied'}",
                            f"data.paths=[{srp_data}]", f"checkpoint.save={out}"])
    return out, done.stdout


def test_continued_pretraining_learns_the_reflections(hf_models, srp_data, continued):
    from megatron_srp.training.launch import records, train_losses

    run, log = continued
    assert "fresh optimizer and LR schedule" in log and "starting at step 0" in log
    lrs = [r["lr"] for r in records(run, "train")]
    assert lrs[0] == pytest.approx(3e-3 / 2) and lrs[1] == pytest.approx(3e-3)  # re-warmed
    losses = train_losses(run)
    assert losses[8] < losses[1] - 0.5, losses
    got = _child("reflection_loss", {"runs": [str(hf_models["root"] / "run-untied"), str(run)],
                                     "dataset": srp_data, "documents": 40},
                 hf_models["root"] / "reflection.json")
    before, after = got[str(hf_models["root"] / "run-untied")], got[str(run)]
    assert before["tokens"] == after["tokens"] >= 80
    assert after["loss"] < before["loss"] - 1.0, got  # 9.28 -> 7.19 nats when written


@pytest.mark.slow  # one more training run (about 15 s here)
def test_a_killed_continued_run_resumes_itself_not_the_import(hf_models, srp_data, continued,
                                                              tmp_path):
    """The state a kill after step 4 leaves (its checkpoint, tokenizer), restarted with the
    same command: it resumes at step 4 and replays the uninterrupted run's losses exactly."""
    from megatron_srp.training.launch import run_pretrain, train_losses

    run, _ = continued
    shutil.copytree(run / "iter_0000004", tmp_path / "iter_0000004")
    shutil.copytree(run / "tokenizer", tmp_path / "tokenizer")
    (tmp_path / "latest").write_text("iter_0000004\n")
    done = run_pretrain(1, [*CONTINUE, f"checkpoint.pretrained={hf_models['root'] / 'run-untied'}",
                            f"data.paths=[{srp_data}]", f"checkpoint.save={tmp_path}"])
    assert "starting at step 4" in done.stdout and "resumed from" in done.stdout
    expected, got = train_losses(run), train_losses(tmp_path)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == expected[step], step


@pytest.mark.slow
def test_a_trained_checkpoint_survives_export_then_import(hf_models, continued):
    """import(export(checkpoint)) of the continued run (trained here, fp32): its logits."""
    root = hf_models["root"]
    got = _child("roundtrip", {"run": str(continued[0]), "export": str(root / "export-cont"),
                               "again": str(root / "cont-again")}, root / "roundtrip.json")
    assert got["rc"] == 0 and got["same_tokenizer"]
    assert got["scale"] > 1.0 and got["max_diff"] <= 1e-5, got


@pytest.mark.slow
def test_finetuning_starts_from_an_import_at_tp2(hf_models, imported, shared_data, tmp_path):
    """finetune_srp.py takes an import as finetune.pretrained and trains it at TP=2."""
    from megatron_srp.training.launch import FINETUNE, run_pretrain, train_losses

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {n}.", "response": " ".join(
        str(i) for i in range(1, n + 1))}) + "\n" for n in range(2, 34)))
    out = tmp_path / "tuned"
    run_pretrain(2, ["--config", "examples/finetune/instruct.yaml",
                     f"finetune.pretrained={hf_models['root'] / 'run-tied'}",
                     f"finetune.data=[{data}]", f"checkpoint.save={out}", "finetune.epochs=4",
                     "train.lr=3e-3", "train.micro_batch_size=2", "train.global_batch_size=4",
                     "train.seq_length=64", "parallel.tensor_model_parallel_size=2",
                     "checkpoint.save_interval=0", "logging.log_interval=1",
                     "logging.progress_bar=false"], script=FINETUNE)
    losses = train_losses(out)
    assert len(losses) == 32 and losses[32] < losses[1] - 1.0, losses
    assert (out / "latest").read_text().strip() == "iter_0000032"


def test_a_dataset_of_another_tokenizer_is_refused_naming_both(hf_models, imported, tmp_path,
                                                               shared_data, capsys):
    import importlib.util

    from megatron_srp.data.preprocess import preprocess
    from megatron_srp.tokenizer import train_bpe_tokenizer

    other = train_bpe_tokenizer([shared_data / "tinyshakespeare" / "input.txt"], 600,
                                tmp_path / "other-tok")
    preprocess([shared_data / "tinyshakespeare" / "input.txt"], tmp_path / "plays", other,
               workers=1, progress=False)
    spec = importlib.util.spec_from_file_location("pretrain_srp", REPO_ROOT / "tools" /
                                                  "pretrain_srp.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    pretrained = hf_models["root"] / "run-untied"
    rc = tool.main([*CONTINUE, f"checkpoint.pretrained={pretrained}",
                    f"data.paths=[{tmp_path / 'plays'}]", f"checkpoint.save={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint.pretrained" in err, err
    assert imported["untied"]["fingerprint"] in err and other.fingerprint in err
    assert not (tmp_path / "run").exists()


def test_an_import_cannot_be_resumed_and_load_excludes_pretrained(hf_models, imported):
    from megatron_srp.config import ConfigError, load_config
    from megatron_srp.training import checkpoint as ckpt
    from megatron_srp.validation import Platform, validate

    run = hf_models["root"] / "run-untied"
    with pytest.raises(ckpt.CheckpointError, match="weights only.*checkpoint.pretrained="):
        ckpt.load(ckpt.resolve_checkpoint(run), None, None, None, None, 0)
    cfg = load_config(overrides=[f"checkpoint.load={run}", f"checkpoint.pretrained={run}"])
    with pytest.raises(ConfigError, match="checkpoint.pretrained.*not both"):
        validate(cfg, 1, Platform(False, None, False), require_data=False)


# ------------------------------------------------------------------- the recipes

# SmolLM2-1.7B's published config.json (transformers 4 layout: rope_theta at the top level).
SMOLLM2_1_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
                "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                "num_attention_heads": 32, "num_key_value_heads": 32,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_scaling": None,
                "rope_theta": 130000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                "vocab_size": 49152, "bos_token_id": 0, "eos_token_id": 0}


def test_continue_recipes_validate_with_the_imported_model(tmp_path):
    """The SmolLM2-1.7B recipe, with the model its import would record, is valid on 8 H100s
    and fits by the memory estimate; its config maps to the smollm2-1.7b preset's shape."""
    from megatron_srp.config import load_config
    from megatron_srp.model.hf_llama import read_hf_config
    from megatron_srp.presets import get_preset
    from megatron_srp.training.memory import estimate_memory, fits
    from megatron_srp.validation import Platform, validate

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_1_7B))
    model = read_hf_config(tmp_path).model_overrides()
    recipe = REPO_ROOT / "examples" / "continue" / "smollm2_1.7b_srp.yaml"
    cfg = load_config(recipe, inherited={"model": model})
    assert cfg.checkpoint.pretrained == "runs/smollm2-1.7b-import"
    validate(cfg, 8, Platform(True, (9, 0), True), check_files=False)
    preset, shape = get_preset("smollm2-1.7b"), cfg.model.shape()
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "rotary_base", "tie_embeddings", "norm_epsilon"):
        assert getattr(shape, key) == getattr(preset, key), key
    assert fits(estimate_memory(cfg, 8, 49156), 80 * 2**30)
    tiny = load_config(REPO_ROOT / "examples" / "continue" / "tiny_cpu.yaml",
                       inherited={"model": {**model, "num_layers": 4, "hidden_size": 128,
                                            "ffn_hidden_size": 384, "num_attention_heads": 4,
                                            "num_query_groups": 2}})
    validate(tiny, 2, Platform(False, None, False), check_files=False)


@pytest.mark.parametrize("change, needle", [
    ({"attention_bias": True}, "'attention_bias' is true"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
     "rope_scaling.low_freq_factor"),
    ({"head_dim": 128}, "head_dim 128"),
    ({"rope_theta": 10000.5}, "not a whole number"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
])
def test_configs_the_import_cannot_reproduce_are_refused(tmp_path, change, needle):
    from megatron_srp.model.hf_llama import HFImportError, read_hf_config

    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM2_1_7B, **change}))
    with pytest.raises(HFImportError, match="config.json") as err:
        read_hf_config(tmp_path)
    assert needle in str(err.value)
