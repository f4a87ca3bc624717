"""Measure what a real Megatron run holds, for tests/test_memory_estimate.py.

Run under torchrun with 2 ranks. For each layout it builds the tiny model, DDP and the Megatron
optimizer through the trainer's own code, runs one training step, and records per rank the
bytes of the parameters, the DDP gradient buffers and the optimizer's state (distinct
storages); for PP=1 layouts it also records the bytes a forward pass saves for backward
(``saved_tensors_hooks``), for the first layer and for the whole model.

    torchrun --nproc_per_node=2 tests/_memory_child.py OUT.json
"""
from __future__ import annotations

import gc
import json
import math
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from megatron_srp import compat
from megatron_srp.config import load_config
from megatron_srp.data.gpt_data import BatchPlan
from megatron_srp.model.provider import build_model_chunks
from megatron_srp.training import parallel
from megatron_srp.training.step import train_step
from megatron_srp.training.trainer import build_training_state
from megatron_srp.validation import Platform

VOCAB = 8000  # padded to 8064 at TP=1, 8192 at TP=2
BASE = ["model.preset=tiny", "train.seq_length=128", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.warmup_iters=1", "train.train_iters=2"]
LAYOUTS = {  # name: (overrides, precision, measure activations)
    "dp2_fp32": (["parallel.use_distributed_optimizer=false"], "fp32", True),
    "dp2_fp32_distopt": ([], "fp32", False),
    "dp2_bf16": (["parallel.use_distributed_optimizer=false"], "bf16", False),
    "dp2_bf16_distopt": ([], "bf16", False),
    "tp2_sp_fp32_distopt": (["parallel.tensor_model_parallel_size=2",
                             "parallel.sequence_parallel=true"], "fp32", True),
    "pp2_fp32_distopt": (["parallel.pipeline_model_parallel_size=2"], "fp32", False),
}
RECOMPUTE_CHECKS = {"none": [], "selective": ["model.recompute=selective"],
                    "full": ["model.recompute=full"], "mha_none": ["model.num_query_groups=4"]}


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _batches(cfg, n: int):
    gen = torch.Generator().manual_seed(0)
    b, s = cfg.train.micro_batch_size, cfg.train.seq_length
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (b, s + 1), generator=gen)
        yield {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
               "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, -1)}


def static_bytes(cfg, precision: str) -> dict:
    model, optimizer, scheduler = build_training_state(cfg, VOCAB, precision, Platform.detect())
    plan = BatchPlan(cfg.train.global_batch_size, cfg.train.micro_batch_size,
                     mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank())
    stats = train_step(model, optimizer, scheduler, _batches(cfg, plan.num_microbatches),
                       plan.num_microbatches, cfg.train.seq_length, cfg.train.micro_batch_size)
    # sizes read off a step that did not train would measure nothing: fail here, loudly
    assert not math.isnan(stats["grad_norm"]) and stats["grad_norm"] > 0, stats
    params = [p for m in model for p in m.parameters()]
    weights = _storages(params)  # with the distributed optimizer: the DDP param buffer
    grads = _storages(b.grad_data for m in model for b in m.buffers)
    state = {}
    for inner in compat._torch_adams(optimizer):
        tensors = [p for g in inner.param_groups for p in g["params"]]
        tensors += [v for st in inner.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0]
        state.update(_storages(tensors))
    state = {k: v for k, v in state.items() if k not in weights}
    emb = [p.shape[0] for m in model for n, p in m.named_parameters()
           if n.endswith("word_embeddings.weight")]
    out = {"weights": sum(weights.values()), "gradients": sum(grads.values()),
           "optimizer": sum(state.values()), "embedding_rows": emb,
           "pp_rank": mpu.get_pipeline_model_parallel_rank()}
    assert out["weights"] > 0 and out["gradients"] > 0 and out["optimizer"] > 0, out
    del model, optimizer, scheduler
    return out


def saved_activation_bytes(cfg) -> dict:
    """Bytes one microbatch's forward saves for backward: first layer, and whole model."""
    model = build_model_chunks(cfg, VOCAB, "fp32", False)[0]
    model.train()
    params = _storages(model.parameters())
    seen: dict[int, int] = {}
    first_layer: dict[int, int] = {}
    in_first = [False]

    def pack(t):
        key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        if key not in params:
            seen[key] = size
            if in_first[0]:
                first_layer[key] = size
        return t

    layer = model.decoder.layers[0]
    layer.register_forward_pre_hook(lambda *a: in_first.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: in_first.__setitem__(0, False))
    batch = next(_batches(cfg, 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    layer_bytes, model_bytes = sum(first_layer.values()), sum(seen.values())
    # the hooks saw the pass (with full recomputation a layer itself may save nothing)
    assert 0 <= layer_bytes < model_bytes, (layer_bytes, model_bytes)
    return {"first_layer": layer_bytes, "model": model_bytes}


def main(out_path: str) -> None:
    results = {}
    for name, (overrides, precision, acts) in LAYOUTS.items():
        cfg = load_config(None, BASE + overrides)
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        parallel.initialize(cfg)
        results[name] = {"overrides": BASE + overrides, "precision": precision,
                         "static": static_bytes(cfg, precision)}
        if acts:
            results[name]["activations"] = {
                key: {"overrides": extra,
                      **saved_activation_bytes(load_config(None, BASE + overrides + extra))}
                for key, extra in RECOMPUTE_CHECKS.items()}
        gc.collect()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
