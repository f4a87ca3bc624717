"""A Hugging Face Llama directory -> a run directory that every tool of the project loads.

The output is what a finished run leaves (``iter_0000000/`` with Megatron's distributed
checkpoint and ``run.json``, ``latest``, ``tokenizer/``), marked ``weights_only``: pretraining
and finetuning start from it with ``checkpoint.pretrained`` / ``finetune.pretrained``,
sampling, evaluation, attacks and export read it as any checkpoint, at any TP/PP layout (the
checkpoint format reshards). The model config comes from ``config.json`` (``preset:
custom``), the tokenizer from ``tokenizer.json`` in the project's format: the project's special
tokens (end of document, padding, the reflection markers, the harmfulness tag) are added where
the tokenizer lacks them, and their embedding and output rows are initialised here, to the mean
of the existing rows by default (docs/import.md).

Memory: the model is built once in the import dtype and each safetensors tensor is read on its
own (a layer's q/k/v or gate/up together), so the import holds about one copy of the weights.
Every check (config, tokenizer, each weight's presence and shape) runs before anything is
built, and the directory is assembled beside ``out`` and renamed into place at the end, so a
refused or failed import writes nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from tokenizers import Tokenizer

from megatron_srp.config import ExperimentConfig, load_config, to_yaml
from megatron_srp.model.hf_llama import (CONFIG_FILE, HFImportError, HFLlama, WeightIndex,
                                         check_weights, fill_rows, megatron_layer,
                                         read_hf_config)
from megatron_srp.model.provider import build_model_chunks
from megatron_srp.presets import padded_vocab_size
from megatron_srp.tokenizer import TOKENIZER_FILE, SRPTokenizer
from megatron_srp.training import checkpoint as ckpt
from megatron_srp.training import parallel
from megatron_srp.units import staged_directory

DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
NEW_ROWS = ("mean", "normal")
TOKENIZER_SUBDIR = "tokenizer"


@dataclass
class ImportOptions:
    """How to import. ``dtype`` ``auto``: bfloat16 when config.json says so, else float32
    (both hold bf16 weights exactly). ``new_rows``: how the rows of added special tokens start
    (``mean`` of the existing rows, or ``normal`` with ``init_std``). ``seq_length``: the run
    config's sequence length (default: the model's max_position_embeddings)."""

    dtype: str = "auto"
    new_rows: str = "mean"
    init_std: float = 0.02
    seed: int = 1234
    seq_length: Optional[int] = None
    overwrite: bool = False


@dataclass
class ImportReport:
    out: Path
    parameters: int
    vocab_size: int
    new_token_ids: list[int] = field(default_factory=list)
    facts: dict = field(default_factory=dict)


def _dtype(options: ImportOptions, hf: HFLlama) -> str:
    if options.dtype == "auto":
        return "bfloat16" if hf.torch_dtype == "bfloat16" else "float32"
    if options.dtype not in DTYPES:
        raise HFImportError(f"dtype must be auto, {' or '.join(DTYPES)}, got {options.dtype!r}")
    return options.dtype


def load_tokenizer(hf: HFLlama) -> tuple[SRPTokenizer, list[int]]:
    """The project's tokenizer for ``hf`` and the ids it added (rows the HF model lacks)."""
    path = hf.path / TOKENIZER_FILE
    if not path.is_file():
        raise HFImportError(f"no {TOKENIZER_FILE} in {hf.path}: the import needs the "
                            f"model's fast tokenizer")
    try:
        base = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise HFImportError(f"{path}: not a Hugging Face tokenizer ({exc})") from exc
    base_size = max(base.get_vocab(with_added_tokens=True).values()) + 1
    if base_size > hf.vocab_size:
        raise HFImportError(f"{path} has {base_size} ids but {CONFIG_FILE} vocab_size is "
                            f"{hf.vocab_size}: the tokenizer is not this model's")
    tokenizer = SRPTokenizer.from_dir(hf.path)
    tokenizer.name = hf.path.resolve().name
    tokenizer.provenance = {"imported_from": str(hf.path.resolve())}
    new_ids = sorted(i for i in tokenizer.special_token_ids.values() if i >= base_size)
    return tokenizer, new_ids


def import_config(hf: HFLlama, dtype: str, options: ImportOptions) -> ExperimentConfig:
    """The run config an import records: the model from config.json, one process."""
    model = {k: v for k, v in hf.model_overrides().items() if v is not None}
    return load_config(inherited={
        "name": f"import-{hf.path.resolve().name}",
        "model": {**model, "layer_spec": "local", "init_method_std": options.init_std},
        "train": {"seq_length": options.seq_length or hf.max_position_embeddings,
                  "precision": DTYPES[dtype], "seed": options.seed}})


@contextlib.contextmanager
def _one_process(cfg: ExperimentConfig):
    """A TP=1, PP=1 Megatron layout: the caller's, or one of its own torn down after."""
    if mpu.model_parallel_is_initialized():
        if mpu.get_tensor_model_parallel_world_size() != 1 or \
                mpu.get_pipeline_model_parallel_world_size() != 1:
            raise RuntimeError("the import needs Megatron's parallel state at TP=1, PP=1")
        yield
        return
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("run the import as one process (python tools/import_hf.py), not "
                           "under torchrun")
    owns = not dist.is_initialized()
    parallel.initialize(cfg)
    try:
        yield
    finally:
        if owns:
            parallel.destroy()
        elif mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()


def _target(state: dict, *names: str) -> torch.Tensor:
    for name in names:
        if name in state:
            return state[name]
    raise KeyError(f"none of {names} in the Megatron model")


@torch.no_grad()
def _fill(model, hf: HFLlama, weights: WeightIndex, vocab_size: int, new_ids: list[int],
          options: ImportOptions) -> int:
    """Copy every HF tensor into ``model`` (one layer at a time); returns how many were set."""
    state = model.state_dict(keep_vars=True)
    rows = padded_vocab_size(vocab_size, 1)
    done = 0

    def put(names: tuple[str, ...], value: torch.Tensor) -> None:
        nonlocal done
        target = _target(state, *names)
        if tuple(target.shape) != tuple(value.shape):
            raise HFImportError(f"{names[0]}: Megatron expects {list(target.shape)}, the mapped "
                                f"weight is {list(value.shape)}")
        target.data.copy_(value.to(target.dtype))
        done += 1

    tables = [("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    if not hf.tie_embeddings:
        tables.append(("output_layer.weight", "lm_head.weight"))
    for n, (name, hf_name) in enumerate(tables):
        target = _target(state, name)
        if target.shape[0] != rows:
            raise HFImportError(f"{name}: Megatron has {target.shape[0]} rows, expected {rows}")
        fill_rows(target.data, weights.get(hf_name), new_ids, options.new_rows,
                  options.init_std, options.seed + n)
        done += 1
    put(("decoder.final_layernorm.weight",), weights.get("model.norm.weight"))
    for i in range(hf.num_layers):
        prefix = f"decoder.layers.{i}."
        for name, value in megatron_layer(hf, i, weights.get).items():
            te_name = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                       "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}.get(name)
            put((prefix + name, *([prefix + te_name] if te_name else [])), value)
    return done


def _config_digest(hf: HFLlama) -> str:
    return hashlib.sha256((hf.path / CONFIG_FILE).read_bytes()).hexdigest()[:16]


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike,
              options: Optional[ImportOptions] = None, source: Optional[dict] = None
              ) -> ImportReport:
    """Import the Llama directory ``hf_dir`` as the run directory ``out_dir`` (see the module
    doc). Raises :class:`HFImportError` (nothing written) for a directory it cannot import.
    ``source``: what ``hf_dir`` was made from (a GGUF import's file and hash), recorded."""
    options = options or ImportOptions()
    if options.new_rows not in NEW_ROWS:
        raise HFImportError(f"new_rows must be one of {', '.join(NEW_ROWS)}, got "
                            f"{options.new_rows!r}")
    out = Path(out_dir)
    if out.exists() and not options.overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite (--overwrite) to replace it")
    hf = read_hf_config(hf_dir)
    weights = WeightIndex(hf_dir)
    check_weights(hf, weights)
    tokenizer, new_ids = load_tokenizer(hf)
    if source and source.get("chat_source") and tokenizer.chat is not None:
        tokenizer.chat = replace(tokenizer.chat, source=source["chat_source"])
    dtype = _dtype(options, hf)
    cfg = import_config(hf, dtype, options)
    facts = {"precision": DTYPES[dtype], "layer_backend": "local",
             "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint},
             "imported_from": {"path": str(hf.path.resolve()), "config_sha256": _config_digest(hf),
                               "hf_vocab_size": hf.vocab_size, "new_token_ids": new_ids,
                               "new_rows": options.new_rows, "dtype": dtype, **(source or {})},
             "chat_format": tokenizer.chat.source if tokenizer.chat else None}
    if source:
        tokenizer.provenance = {"imported_from": source.get("gguf", str(hf.path.resolve()))}
    with staged_directory(out) as staging:
        with _one_process(cfg):
            model = build_model_chunks(cfg, tokenizer.vocab_size, DTYPES[dtype], False)
            assert len(model) == 1, "TP=1, PP=1 builds one model chunk"
            _fill(model[0], hf, weights, tokenizer.vocab_size, new_ids, options)
            try:
                ckpt.save_weights_only(staging, model, cfg, tokenizer.vocab_size, facts)
            finally:
                ckpt.stop_writer_processes()
            parameters = sum(p.numel() for p in model[0].parameters())
            del model
        tokenizer.save(staging / TOKENIZER_SUBDIR)
        (staging / "config.yaml").write_text(to_yaml(cfg))
    return ImportReport(out, parameters, tokenizer.vocab_size, new_ids, facts)
