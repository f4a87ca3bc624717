"""Layout-invariant weight initialisation.

Megatron initialises each rank's shard from its own RNG stream, so a run with PP=2 starts from a
different model than the same run with PP=1. Here every weight matrix is drawn from a generator
seeded by (seed, checkpoint key, layer index) and each rank keeps only its slice, using the
global shapes and offsets that Megatron's sharded state dict already describes. Any TP/PP/VPP
layout therefore starts from the same model, which is what lets tests compare layouts step by
step and lets a team change layout without changing the experiment.
"""
from __future__ import annotations

import hashlib
import math

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

# Output projections of each block get the depth-scaled std, as in Megatron and GPT-2.
_SCALED_KEYS = ("linear_proj.weight", "linear_fc2.weight")


def _stream_seed(seed: int, key: str, layer: int) -> int:
    digest = hashlib.sha256(f"{seed}/{key}/{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sharded_tensors(obj):
    if isinstance(obj, ShardedTensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _sharded_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _sharded_tensors(v)


@torch.no_grad()
def layout_invariant_init(chunks, seed: int, std: float, num_layers: int,
                          device: torch.device) -> int:
    """Re-draw every weight matrix of ``chunks`` in place; returns how many tensors were set."""
    done = 0
    for chunk in chunks:
        covered = set()
        state = chunk.sharded_state_dict()
        apply_factories(state)
        for sh in _sharded_tensors(state):
            nlead = sh.prepend_axis_num
            full_shape = sh.global_shape[nlead:]
            if len(full_shape) < 2 or not sh.key.endswith("weight"):
                continue  # norms keep their ones; extra states are not weights
            layer = sh.global_offset[0] if nlead else -1
            scale = std / math.sqrt(2.0 * num_layers) if sh.key.endswith(_SCALED_KEYS) else std
            gen = torch.Generator(device=device).manual_seed(_stream_seed(seed, sh.key, layer))
            full = torch.empty(full_shape, dtype=torch.float32, device=device)
            full.normal_(0.0, scale, generator=gen)
            index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[nlead:], sh.local_shape))
            sh.data.copy_(full[index].to(sh.data.dtype))
            covered.add(sh.data.untyped_storage().data_ptr())
            done += 1
        for name, param in chunk.named_parameters():
            if param.dim() >= 2 and param.untyped_storage().data_ptr() not in covered:
                raise RuntimeError(f"layout-invariant init does not cover parameter {name}")
    return done
