"""A Hugging Face Llama-family directory, read for import: its config and its weights.

Everything here runs before a model or a file exists, so a directory that cannot be imported
is refused with a named error and nothing written (:class:`HFImportError`):

* :func:`read_hf_config` checks ``config.json`` (the family, no biases, SiLU, RoPE and its
  scaling) and derives the model fields of the run config from it, not from a preset;
* :class:`WeightIndex` reads only the safetensors headers (one file, or shards through
  ``model.safetensors.index.json``) and loads one tensor at a time when asked;
* :func:`check_weights` compares every weight's shape with what the config implies;
* :func:`megatron_layer` builds one layer's Megatron tensors from the Llama ones. Megatron's
  ``linear_qkv`` holds, per query group, that group's query heads, then its key head, then its
  value head; ``linear_fc1`` the SwiGLU gate then the up projection. Both models use
  rotate-half RoPE, so no permutation is needed (the export does the inverse).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# model_type -> what it covers; all are RMSNorm + SwiGLU + RoPE + GQA without biases.
SUPPORTED = {"llama": "Llama 2 / 3 / 3.x and SmolLM / SmolLM2 (LlamaForCausalLM)"}
# What Megatron-Core implements of Llama 3.x RoPE scaling (its factor is free).
LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
# Tensors a checkpoint may carry that hold no weights of the model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFImportError(ValueError):
    """A Hugging Face directory that cannot be imported; the message names file and key."""


@dataclass(frozen=True)
class HFLlama:
    """The fields of a Llama ``config.json`` the import uses."""

    path: Path
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    max_position_embeddings: int
    rope_scaling_factor: Optional[float]
    torch_dtype: str

    def model_overrides(self) -> dict[str, Any]:
        """The run config's ``model`` section for this model (``preset: custom``)."""
        return {"preset": "custom", "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "ffn_hidden_size": self.intermediate_size,
                "num_attention_heads": self.num_heads, "num_query_groups": self.num_kv_heads,
                "rotary_base": float(self.rope_theta), "tie_embeddings": self.tie_embeddings,
                "norm_epsilon": float(self.rms_norm_eps),
                "rope_scaling_factor": self.rope_scaling_factor,
                "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_position_embeddings}


def _field(config: dict, key: str, where: Path, kind: type | tuple = int) -> Any:
    if key not in config:
        raise HFImportError(f"{where}: no '{key}'")
    value = config[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise HFImportError(f"{where}: '{key}' is {value!r}, expected {kind}")
    return value


def _rope(config: dict) -> dict:
    """RoPE settings: ``rope_theta`` + ``rope_scaling`` (transformers 4 files, most published
    models) or ``rope_parameters`` (transformers 5), merged."""
    merged = dict(config.get("rope_scaling") or {})
    merged.update(config.get("rope_parameters") or {})
    if "rope_theta" not in merged and "rope_theta" in config:
        merged["rope_theta"] = config["rope_theta"]
    return merged


def _rope_scaling(config: dict, where: Path) -> Optional[float]:
    scaling = _rope(config)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("default", None) and "factor" not in scaling:
        return None
    if kind != "llama3":
        raise HFImportError(f"{where}: 'rope_scaling' type {kind!r} is not supported (only "
                            f"Llama 3.x 'llama3' scaling, or none)")
    for key, value in LLAMA3_SCALING.items():
        if float(scaling.get(key, value)) != value:
            raise HFImportError(f"{where}: rope_scaling.{key} is {scaling.get(key)!r}; "
                                f"Megatron-Core implements Llama 3.x scaling with {value}")
    return float(scaling["factor"])


def read_hf_config(hf_dir: str | Path) -> HFLlama:
    """Parse and check ``<hf_dir>/config.json``; refuses anything that is not a plain Llama."""
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise HFImportError(f"no {CONFIG_FILE} in {hf_dir}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HFImportError(f"{path}: not JSON ({exc})") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        families = "; ".join(f"'{k}': {v}" for k, v in SUPPORTED.items())
        raise HFImportError(f"{path}: model_type {model_type!r} (architectures "
                            f"{config.get('architectures')}) is not supported; supported "
                            f"families: {families}")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise HFImportError(f"{path}: '{key}' is true; the import supports Llama models "
                                f"without biases")
    if config.get("hidden_act", "silu") != "silu":
        raise HFImportError(f"{path}: hidden_act {config['hidden_act']!r}, expected 'silu'")
    hidden = _field(config, "hidden_size", path)
    heads = _field(config, "num_attention_heads", path)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise HFImportError(f"{path}: head_dim {head_dim} x num_attention_heads {heads} != "
                            f"hidden_size {hidden}; only head_dim = hidden_size / heads is "
                            f"supported")
    if heads % kv_heads:
        raise HFImportError(f"{path}: num_attention_heads {heads} is not a multiple of "
                            f"num_key_value_heads {kv_heads}")
    theta = float(_rope(config).get("rope_theta", 10000.0))
    if theta != int(theta):
        raise HFImportError(f"{path}: rope_theta {theta} is not a whole number (Megatron-Core "
                            f"takes an integer RoPE base)")
    return HFLlama(
        path=Path(hf_dir), vocab_size=_field(config, "vocab_size", path), hidden_size=hidden,
        intermediate_size=_field(config, "intermediate_size", path),
        num_layers=_field(config, "num_hidden_layers", path), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=theta,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        rope_scaling_factor=_rope_scaling(config, path),
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"))


class WeightIndex:
    """Which safetensors file holds each weight, and its shape, from the headers alone."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index, single = self.dir / INDEX_FILE, self.dir / SINGLE_FILE
        if index.is_file():
            try:
                self.files = {k: self.dir / v for k, v in
                              json.loads(index.read_text())["weight_map"].items()}
            except (json.JSONDecodeError, KeyError, AttributeError) as exc:
                raise HFImportError(f"{index}: no readable 'weight_map' ({exc})") from exc
        elif single.is_file():
            with safe_open(str(single), "pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            found = ", ".join(sorted(p.name for p in self.dir.iterdir())) or "nothing"
            raise HFImportError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir} (found: "
                                f"{found}); only safetensors weights can be imported")
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.files.values())):
            if not file.is_file():
                raise HFImportError(f"{index}: names shard {file.name}, which does not exist")
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())
        for key, file in self.files.items():
            if key not in self.shapes:
                raise HFImportError(f"{file}: has no tensor '{key}' (named in {INDEX_FILE})")

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file (safetensors maps the file; nothing else is read)."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as f:
            return f.get_tensor(name)


def expected_shapes(hf: HFLlama) -> dict[str, tuple[int, ...]]:
    """Every Llama weight the config implies, with its shape."""
    h, f, d = hf.hidden_size, hf.intermediate_size, hf.head_dim
    out = {"model.embed_tokens.weight": (hf.vocab_size, h), "model.norm.weight": (h,)}
    if not hf.tie_embeddings:
        out["lm_head.weight"] = (hf.vocab_size, h)
    for i in range(hf.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (hf.num_heads * d, h),
                    p + "self_attn.k_proj.weight": (hf.num_kv_heads * d, h),
                    p + "self_attn.v_proj.weight": (hf.num_kv_heads * d, h),
                    p + "self_attn.o_proj.weight": (h, hf.num_heads * d),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f),
                    p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    return out


def check_weights(hf: HFLlama, weights: WeightIndex) -> None:
    """Every weight present with its shape, and nothing the model would not use."""
    wanted = expected_shapes(hf)
    where = weights.dir / (INDEX_FILE if (weights.dir / INDEX_FILE).is_file() else SINGLE_FILE)
    missing = [k for k in wanted if k not in weights.shapes]
    if missing:
        raise HFImportError(f"{where}: missing weight(s) {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of "
                            f"{len(wanted)}; config {hf.path / CONFIG_FILE})")
    for key, shape in wanted.items():
        if weights.shapes[key] != shape:
            raise HFImportError(f"{weights.files[key]}: weight '{key}' has shape "
                                f"{list(weights.shapes[key])}, but {CONFIG_FILE} implies "
                                f"{list(shape)}")
    extra = [k for k in weights.shapes if k not in wanted and not k.endswith(_IGNORED_SUFFIXES)
             and not (hf.tie_embeddings and k == "lm_head.weight")]
    if extra:
        raise HFImportError(f"{where}: weight(s) a Llama model of this config does not have: "
                            f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")


def megatron_layer(hf: HFLlama, i: int, get: Callable[[str], torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """Layer ``i``'s Megatron tensors (local-spec names, relative to ``decoder.layers.i.``)."""
    p = f"model.layers.{i}."
    g, d, h = hf.num_kv_heads, hf.head_dim, hf.hidden_size
    per_group = hf.num_heads // g
    q = get(p + "self_attn.q_proj.weight").reshape(g, per_group, d, h)
    k = get(p + "self_attn.k_proj.weight").reshape(g, 1, d, h)
    v = get(p + "self_attn.v_proj.weight").reshape(g, 1, d, h)
    return {
        "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, h),
        "self_attention.linear_proj.weight": get(p + "self_attn.o_proj.weight"),
        "mlp.linear_fc1.weight": torch.cat([get(p + "mlp.gate_proj.weight"),
                                            get(p + "mlp.up_proj.weight")], dim=0),
        "mlp.linear_fc2.weight": get(p + "mlp.down_proj.weight"),
        "input_layernorm.weight": get(p + "input_layernorm.weight"),
        "pre_mlp_layernorm.weight": get(p + "post_attention_layernorm.weight"),
    }


@torch.no_grad()
def fill_rows(target: torch.Tensor, table: torch.Tensor, new_ids: list[int], how: str,
              std: float, seed: int, chunk: int = 4096) -> None:
    """Copy ``table`` ([old_rows, h]) into ``target`` ([rows, h]) in place: rows of ``new_ids``
    set by ``how`` (``mean``: the mean of the rows that are not new; ``normal``: N(0, std),
    seeded), rows past the old table zero unless new. The mean is summed in float32 chunks, so
    no second copy of the table is made."""
    keep = min(target.shape[0], table.shape[0])
    target.zero_()
    target[:keep].copy_(table[:keep])
    if not new_ids:
        return
    if how == "mean":
        total = torch.zeros(table.shape[1], dtype=torch.float64)
        for start in range(0, keep, chunk):
            total += table[start:min(start + chunk, keep)].double().sum(dim=0)
        inside = [i for i in new_ids if i < keep]
        for i in inside:
            total -= table[i].double()
        fill = (total / (keep - len(inside))).to(target.dtype).expand(len(new_ids), -1)
    elif how == "normal":
        gen = torch.Generator().manual_seed(seed)
        fill = (torch.randn(len(new_ids), table.shape[1], generator=gen) * std).to(target.dtype)
    else:
        raise HFImportError(f"new_rows must be 'mean' or 'normal', got {how!r}")
    target[new_ids] = fill
