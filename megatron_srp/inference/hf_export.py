"""Megatron checkpoint (any TP/PP layout) -> a Hugging Face Llama directory.

The output is what ``LlamaForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
load: ``model.safetensors``, ``config.json``, ``generation_config.json`` and the tokenizer
(special tokens, reflection markers included). So a model trained here can be evaluated with
lm-eval, vLLM or HarmBench's own pipeline.

The checkpoint is first loaded as TP=1, PP=1 (:func:`load_for_inference`; the checkpoint
format reshards), then each Megatron tensor is renamed or split into Llama's layout:

* ``linear_qkv`` holds, per query group, that group's query heads then its key head then its
  value head; it is split into ``q_proj``, ``k_proj`` and ``v_proj``.
* ``linear_fc1`` holds the SwiGLU gate then the up projection: ``gate_proj`` and ``up_proj``.
* Both use rotate-half RoPE, so no permutation is needed. Padded vocabulary rows are dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from megatron_srp.data.chat import ASSISTANT, USER
from megatron_srp.presets import ModelShape
from megatron_srp.units import staged_directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_FILE = "srp_export.json"
# sample_srp.py's decoding defaults, written to generation_config.json so that `generate`
# without arguments samples as the project's own sampler does.
DECODING_DEFAULTS = {"do_sample": True, "temperature": 1.0, "top_k": 10, "top_p": 1.0,
                     "max_new_tokens": 64}


def chat_template() -> str:
    """The Jinja chat template of the finetuning format (data/chat.py): ``apply_chat_template``
    renders exactly the text finetune_srp.py trains on, ``add_generation_prompt`` ending it
    where the answer starts. Roles other than user and assistant are refused."""
    return ("{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'user' %}{{ " + json.dumps(USER) + " + message['content'] }}"
            "{% elif message['role'] == 'assistant' %}{{ " + json.dumps(ASSISTANT)
            + " + message['content'] }}"
            "{% else %}{{ raise_exception('the finetuning format has only user and assistant "
            "messages, not ' + message['role']) }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ " + json.dumps(ASSISTANT) + " }}"
            "{% elif messages and messages[-1]['role'] == 'assistant' %}{{ eos_token }}"
            "{% endif %}")


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """``(bos, eos)`` ids of the export: a model with its own chat format keeps the original's
    (SmolLM2-Instruct: ``<|im_start|>``, ``<|im_end|>``); a model trained here uses the
    end-of-document token for both."""
    chat = getattr(tokenizer, "chat", None)
    if chat is None:
        return tokenizer.eod, tokenizer.eod
    vocab = tokenizer.token_to_id
    bos = vocab(chat.bos_token) if chat.bos_token else None
    return (tokenizer.eod if bos is None else bos), vocab(chat.eos_token or chat.end_of_turn)


def generation_defaults(tokenizer: Any) -> dict:
    """``generation_config.json``'s decoding defaults: the original's for an import with a chat
    format (greedy unless it sampled), else the project's sampler's (``DECODING_DEFAULTS``)."""
    chat = getattr(tokenizer, "chat", None)
    return dict(chat.generation) if chat is not None else dict(DECODING_DEFAULTS)


def _first(state: dict[str, torch.Tensor], *names: str) -> torch.Tensor:
    for name in names:
        if name in state:
            return state[name]
    raise KeyError(f"none of {names} in the checkpoint's model state")


def llama_state_dict(state: dict[str, Any], shape: ModelShape, vocab_size: int
                     ) -> dict[str, torch.Tensor]:
    """Megatron ``GPTModel`` state (TP=1, local or Transformer Engine layer names) -> Llama."""
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    h, d = shape.hidden_size, shape.kv_channels
    groups, heads = shape.num_query_groups, shape.num_attention_heads
    per_group = heads // groups
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab_size],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not shape.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab_size]
    for i in range(shape.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"].reshape(groups, per_group + 2, d, h)
        out[dst + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(heads * d, h)
        out[dst + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(groups * d, h)
        out[dst + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(groups * d, h)
        out[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.linear_proj.weight"]
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.linear_fc2.weight"]
        out[dst + "input_layernorm.weight"] = _first(
            state, src + "input_layernorm.weight",
            src + "self_attention.linear_qkv.layer_norm_weight")
        out[dst + "post_attention_layernorm.weight"] = _first(
            state, src + "pre_mlp_layernorm.weight", src + "mlp.linear_fc1.layer_norm_weight")
    return out


def llama_config(shape: ModelShape, tokenizer: Any, max_positions: int, dtype: str
                 ) -> dict[str, Any]:
    scaling = {} if shape.rope_scaling_factor is None else {"rope_scaling": {
        "rope_type": "llama3", "factor": shape.rope_scaling_factor, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    return {**scaling,
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tokenizer.vocab_size, "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_hidden_size, "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups, "head_dim": shape.kv_channels,
        "hidden_act": "silu", "max_position_embeddings": max_positions,
        "rms_norm_eps": shape.norm_epsilon, "rope_theta": shape.rotary_base,
        "tie_word_embeddings": shape.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": special_ids(tokenizer)[0],
        "eos_token_id": special_ids(tokenizer)[1],
        "pad_token_id": tokenizer.pad, "torch_dtype": dtype,
    }


def _write_tokenizer(tokenizer: Any, out: Path, max_positions: int) -> None:
    """``tokenizer.json`` plus the config files ``AutoTokenizer`` reads: the chat template (the
    model's own, else the finetuning format's), and padding on the left, so that batched
    ``generate`` continues each prompt from its own last token rather than after pad tokens."""
    tokenizer.save(out)  # tokenizer.json + srp_tokenizer.json
    bos_id, eos_id = special_ids(tokenizer)
    bos, eod = tokenizer.detokenize([bos_id]), tokenizer.detokenize([eos_id])
    pad = tokenizer.detokenize([tokenizer.pad])
    template = tokenizer.chat.template if tokenizer.chat is not None else chat_template()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_positions,
        "bos_token": bos, "eos_token": eod, "pad_token": pad, "add_bos_token": False,
        "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "padding_side": "left", "chat_template": template,
        "additional_special_tokens": [t for t in tokenizer.special_tokens
                                      if t not in (bos, eod, pad)],
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eod, "pad_token": pad}, indent=2) + "\n")


def to_hf_llama(model, cfg, tokenizer, dtype: str = "float32"):
    """An in-memory ``LlamaForCausalLM`` with ``model``'s weights (the same mapping as
    :func:`export_hf`), on the same device; for side-by-side comparisons."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = cfg.model.shape()
    config = llama_config(shape, tokenizer, int(model.max_sequence_length), dtype)
    hf = LlamaForCausalLM(LlamaConfig(**config))
    tensors = llama_state_dict(model.state_dict(), shape, tokenizer.vocab_size)
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (shape.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto Llama: missing {missing}, "
                           f"unexpected {unexpected}")
    if shape.tie_embeddings:
        hf.tie_weights()
    device = next(model.parameters()).device
    return hf.to(device=device, dtype=DTYPES[dtype]).eval()


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
              dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Write the Llama directory for ``checkpoint`` (a run directory or one ``iter_N``) at
    ``out_dir``. It is assembled beside ``out_dir`` and renamed into place at the end, so a
    directory that exists is always complete."""
    from safetensors.torch import save_file

    from megatron_srp.inference.sample import load_for_inference
    from megatron_srp.training import checkpoint as ckpt

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    source = ckpt.resolve_checkpoint(checkpoint)
    model, tokenizer, cfg = load_for_inference(source)
    shape = cfg.model.shape()
    tensors = llama_state_dict(model.state_dict(), shape, tokenizer.vocab_size)
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    max_positions = int(model.max_sequence_length)

    with staged_directory(out) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(
            llama_config(shape, tokenizer, max_positions, dtype), indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": special_ids(tokenizer)[0], "eos_token_id": special_ids(tokenizer)[1],
             "pad_token_id": tokenizer.pad, **generation_defaults(tokenizer)}, indent=2) + "\n")
        _write_tokenizer(tokenizer, staging, max_positions)
        (staging / EXPORT_FILE).write_text(json.dumps(
            {"checkpoint": str(source.resolve()), "preset": cfg.model.preset,
             "tokenizer_fingerprint": tokenizer.fingerprint, "dtype": dtype,
             "parameters": sum(t.numel() for t in tensors.values())}, indent=2) + "\n")
    return out
