"""Per-GPU memory of a training run, predicted from its config before anything is allocated.

A layout that does not fit fails minutes into a job, after the model is built and the first
pipeline has filled; this says so up front (``tools/estimate_memory.py``, and a warning from
``pretrain`` on a GPU). Pure arithmetic: no torch, no Megatron.

Per rank of the largest pipeline stage (P = parameters held by the rank, after TP and PP):

* **weights**: 2 bytes x P in bf16/fp8, 4 in fp32. FP8 adds 2 bytes per transformer-layer GEMM
  weight: the FP8 copy and its transpose that Transformer Engine caches across microbatches.
* **gradients**: 4 bytes x P. ``optim.wrap_ddp`` sets ``grad_reduce_in_fp32``, so Megatron DDP's
  contiguous gradient buffer (``param.main_grad``) is fp32 whatever the precision, and full size
  on every DP rank (the distributed optimizer reduce-scatters into it; ZeRO-1, not ZeRO-2).
* **optimizer state**: Adam m and v in fp32 (8 bytes x P), plus the fp32 main copy of bf16
  weights (4 more; in fp32 the model weights are the main weights). Divided by DP with
  ``parallel.use_distributed_optimizer``.
* **activations**: what the forward pass of a microbatch saves for backward, times the
  microbatches the schedule holds in flight on that stage.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"): count, per layer, every tensor an op keeps for its backward. Their GPT-3
layer saves ``sbh(34 + 5as/h)`` bytes in 16 bit. This model differs, so the count is redone for
its modules (s sequence, b micro batch, h hidden, f FFN, k = query groups x head dim, t = TP,
sp = t with sequence parallelism else 1), in elements of the activation dtype::

    per layer   sb * (6h/sp + (A + 5f)/t)
      6h/sp     each RMSNorm keeps its input, input x rstd and output (= the next GEMM's input)
      A         attention, with no s x s term (flash/SDPA recompute the scores; dropout is 0):
                  no recompute, GQA: Q, K and V expanded to all heads, output    = 4h
                  no recompute, MHA: Q, K, the QKV output (V is a view), output = 4h + 2k
                  selective (core attention recomputed): Q, K, QKV output, output = 3h + 3k
      5f        SwiGLU: FC1 output (2f), SiLU output, the up half (+0, a copy), FC2 input
    full recompute: each layer keeps only its input (sbh/sp), and one layer's activations
                exist again while it is recomputed in backward.
    last stage: final norm (3sbh/sp) and the logits, s * b * V/t in fp32 kept by the
                vocab-parallel cross entropy, plus the 16-bit logits while the loss runs.

With SP every term is divided by t (Korthikanti's 34/t). Per-token fp32 scalars (norm rstd,
attention log-sum-exp) and RoPE's cos/sin tables are left out (well under 1% at real sizes). The count is what this project's local layer
spec saves, checked tensor by tensor on CPU (tests/test_memory_estimate.py). Transformer
Engine's fused RMSNorm+GEMM keeps one tensor less per norm and its attention takes K, V at GQA
width, so on a TE GPU run the activations are likely somewhat lower (not measured here).

In flight (Megatron's schedules): 1 without PP; ``min(PP - stage, M)`` with 1F1B, so the first
stage holds PP microbatches of its L/PP layers; with V virtual stages, rank 0 holds
``min(2(PP - 1) + (V - 1)PP + 1, M V)`` chunks of L/(PP V) layers. The stage with the
largest total is reported.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_srp.config import ExperimentConfig
from megatron_srp.presets import ModelShape, padded_vocab_size as padded_vocab
from megatron_srp.validation import HOPPER_WITH_TE, data_parallel_size, resolved_precision

GIB = 2**30
# Kept free of the estimate: CUDA context, cuBLAS/NCCL workspaces and communication buffers
# (a fixed amount), allocator fragmentation and transients not counted above, such as the
# activation gradients in backward (a fraction of the device).
MARGIN_FIXED_BYTES = 2 * GIB
MARGIN_FRACTION = 0.10


@dataclass(frozen=True)
class Layout:
    """What the formulas need of a config's parallel layout, for a given world size."""

    tp: int
    pp: int
    vpp: int
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    microbatches: int  # per step and DP rank

    @staticmethod
    def of(cfg: ExperimentConfig, world_size: int) -> "Layout":
        p, t = cfg.parallel, cfg.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        dp = max(1, data_parallel_size(cfg, world_size))
        return Layout(tp, pp, p.virtual_pipeline_model_parallel_size or 1, dp,
                      p.sequence_parallel, p.use_distributed_optimizer,
                      max(1, t.global_batch_size // (t.micro_batch_size * dp)))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the rank of ``stage`` (the largest stage)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    stage: int
    layers: int  # transformer layers held by the rank
    in_flight: int  # microbatches (chunks with virtual stages) whose activations are held
    precision: str

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def layer_weight_params(shape: ModelShape, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (the norms are replicated)."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    k = shape.num_query_groups * shape.kv_channels
    return (h * (h + 2 * k) + h * h + 3 * h * f) // tp + 2 * h


def stage_parameters(shape: ModelShape, vocab: int, layout: Layout, stage: int) -> int:
    """Parameters held by a rank of pipeline stage ``stage``: its layers, the embedding on the
    first stage, the final norm and output layer on the last (a tied output layer is a second
    copy once PP > 1; Megatron keeps the two in sync)."""
    v = padded_vocab(vocab, layout.tp)
    n = shape.num_layers // layout.pp * layer_weight_params(shape, layout.tp)
    if stage == 0:
        n += v * shape.hidden_size // layout.tp
    if stage == layout.pp - 1:
        n += shape.hidden_size
        if not shape.tie_embeddings or layout.pp > 1:
            n += v * shape.hidden_size // layout.tp
    return n


def layer_activation_elements(shape: ModelShape, seq: int, micro_batch: int, tp: int,
                              sequence_parallel: bool, recompute: str) -> int:
    """Elements one layer saves for backward per microbatch (formula in the module doc);
    with full recomputation, only the checkpointed input."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    k = shape.num_query_groups * shape.kv_channels
    sb, sp = seq * micro_batch, tp if sequence_parallel else 1
    if recompute == "full":
        return sb * h // sp
    if recompute == "selective":
        attn = 3 * h + 3 * k
    elif shape.num_query_groups < shape.num_attention_heads:
        attn = 4 * h
    else:
        attn = 4 * h + 2 * k
    return sb * 6 * h // sp + sb * (attn + 5 * f) // tp


def activation_bytes(shape: ModelShape, vocab: int, seq: int, micro_batch: int, layout: Layout,
                     precision: str, recompute: str, stage: int) -> tuple[int, int, int]:
    """``(bytes, layers, in_flight)`` of activations held at the peak by a rank of ``stage``."""
    e = element_bytes(precision)
    tp, pp, vpp, m = layout.tp, layout.pp, layout.vpp, layout.microbatches
    if pp == 1:
        in_flight = 1
    elif vpp == 1:
        in_flight = min(pp - stage, m)
    else:
        in_flight = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, m * vpp)
    chunk_layers = shape.num_layers // (pp * vpp)
    per_layer = layer_activation_elements(shape, seq, micro_batch, tp, layout.sequence_parallel,
                                          recompute)
    total = in_flight * chunk_layers * per_layer * e
    if recompute == "full":  # one layer recomputed, whole, during its backward
        total += layer_activation_elements(shape, seq, micro_batch, tp, layout.sequence_parallel,
                                           "none") * e
    if stage == pp - 1:
        total += last_stage_activation_bytes(shape, vocab, seq, micro_batch, layout, precision)
    return total, shape.num_layers // pp, in_flight


def last_stage_activation_bytes(shape: ModelShape, vocab: int, seq: int, micro_batch: int,
                                layout: Layout, precision: str) -> int:
    """Final norm and logits of one microbatch (the logits in fp32 for the loss, and in
    16 bit alongside them while it runs)."""
    e = element_bytes(precision)
    sb, sp = seq * micro_batch, layout.tp if layout.sequence_parallel else 1
    logits = sb * padded_vocab(vocab, layout.tp) // layout.tp
    return 3 * sb * shape.hidden_size // sp * e + logits * 4 + (logits * e if e != 4 else 0)


def resolve_precision(cfg: ExperimentConfig, precision: Optional[str] = None) -> str:
    """The precision to plan for: given, else the config's as a GPU run resolves it."""
    return precision or resolved_precision(cfg, HOPPER_WITH_TE)


def element_bytes(precision: str) -> int:
    """Bytes of a weight or an activation: fp32, else 16 bit (FP8 keeps bf16 masters)."""
    return 4 if precision == "fp32" else 2


def estimate_stage(cfg: ExperimentConfig, world_size: int, stage: int,
                   vocab_size: Optional[int] = None, precision: Optional[str] = None
                   ) -> MemoryEstimate:
    """The memory of a rank of pipeline stage ``stage``."""
    shape, layout = cfg.model.shape(), Layout.of(cfg, world_size)
    vocab = vocab_size or shape.vocab_size
    precision = resolve_precision(cfg, precision)
    params = stage_parameters(shape, vocab, layout, stage)
    weights = params * element_bytes(precision)
    if precision == "fp8":  # TE's cached FP8 weight and transpose, layer GEMMs only
        h = shape.hidden_size
        gemm = layer_weight_params(shape, layout.tp) - 2 * h
        weights += 2 * gemm * (shape.num_layers // layout.pp)
    state = params * (8 if precision == "fp32" else 12)
    if layout.distributed_optimizer:
        state = math.ceil(state / layout.dp)
    acts, layers, in_flight = activation_bytes(
        shape, vocab, cfg.train.seq_length, cfg.train.micro_batch_size, layout, precision,
        cfg.model.recompute, stage)
    return MemoryEstimate(weights, params * 4, state, acts, stage, layers, in_flight, precision)


def estimate_memory(cfg: ExperimentConfig, world_size: int, vocab_size: Optional[int] = None,
                    precision: Optional[str] = None) -> MemoryEstimate:
    """The estimate of the pipeline stage that needs the most memory."""
    pp = cfg.parallel.pipeline_model_parallel_size
    stages = [estimate_stage(cfg, world_size, s, vocab_size, precision) for s in range(pp)]
    return max(stages, key=lambda e: e.total)


def plan_memory(cfg: ExperimentConfig, world_size: int, vocab_size: Optional[int] = None
                ) -> MemoryEstimate:
    """``estimate_memory`` for a GPU job that has not started: the config is first checked
    against the layout rules of ``validation.validate`` on a pretend H100 (no files, no data),
    so an impossible layout raises ``ConfigError`` naming the key."""
    from megatron_srp.validation import validate
    validate(cfg, world_size, HOPPER_WITH_TE, check_files=False,
             require_data=False)
    return estimate_memory(cfg, world_size, vocab_size)


def report(estimate: MemoryEstimate, cfg: ExperimentConfig, world_size: int,
           capacity_bytes: int) -> dict:
    """The estimate, the layout and the verdict as one JSON-able record."""
    return {"preset": cfg.model.preset, "layout": describe_layout(cfg, world_size),
            "world_size": world_size, **estimate.to_dict(), "capacity_bytes": capacity_bytes,
            "usable_bytes": usable_bytes(capacity_bytes), "fits": fits(estimate, capacity_bytes)}


def usable_bytes(capacity_bytes: int) -> int:
    """What a run may plan to use of a GPU: the capacity less the margin."""
    return int(capacity_bytes * (1 - MARGIN_FRACTION)) - MARGIN_FIXED_BYTES


def fits(estimate: MemoryEstimate, capacity_bytes: int) -> bool:
    return estimate.total <= usable_bytes(capacity_bytes)


def describe_layout(cfg: ExperimentConfig, world_size: int) -> str:
    lay, t = Layout.of(cfg, world_size), cfg.train
    vpp = f"x{lay.vpp}" if lay.vpp > 1 else ""
    return (f"{cfg.model.preset}, {world_size} GPU(s): TP{lay.tp} PP{lay.pp}{vpp} DP{lay.dp}"
            f"{' SP' if lay.sequence_parallel else ''}"
            f"{', distributed optimizer' if lay.distributed_optimizer else ''}; seq "
            f"{t.seq_length}, micro batch {t.micro_batch_size}, {lay.microbatches} "
            f"microbatches/step, recompute {cfg.model.recompute}")


def format_table(estimate: MemoryEstimate, cfg: ExperimentConfig, world_size: int,
                 capacity_bytes: Optional[int] = None) -> str:
    """The breakdown as a Markdown table in GiB, and whether it fits ``capacity_bytes``."""
    e, lay = estimate, Layout.of(cfg, world_size)
    wdt = {"fp32": "fp32", "bf16": "bf16", "fp8": "bf16 + FP8 cache"}[e.precision]
    main = "Adam m, v" + ("" if e.precision == "fp32" else " + fp32 main weights")
    shard = f", 1/{lay.dp} (distributed optimizer)" if lay.distributed_optimizer else ""
    rows = [(f"weights ({wdt})", e.weights), ("gradients (fp32 DDP buffer)", e.gradients),
            (f"optimizer state ({main}{shard})", e.optimizer),
            (f"activations ({e.in_flight} {'chunk(s)' if lay.vpp > 1 else 'microbatch(es)'} "
             f"in flight x {e.layers // lay.vpp} layers)", e.activations),
            ("**total**", e.total)]
    lines = [f"memory per GPU: {describe_layout(cfg, world_size)}; {e.precision}",
             f"largest stage: {e.stage} of {lay.pp}", "", "| component | GiB |", "|---|---:|"]
    lines += [f"| {name} | {value / GIB:.2f} |" for name, value in rows]
    if capacity_bytes is not None:
        usable = usable_bytes(capacity_bytes)
        verdict = "fits" if fits(e, capacity_bytes) else "DOES NOT FIT"
        lines += ["", f"{verdict}: {e.total / GIB:.1f} GiB of {usable / GIB:.1f} GiB usable on a "
                  f"{capacity_bytes / GIB:.1f} GiB GPU (margin: {MARGIN_FIXED_BYTES // GIB} GiB "
                  f"+ {MARGIN_FRACTION:.0%} for the CUDA context, NCCL and fragmentation)"]
    return "\n".join(lines)


def warn_if_short(cfg: ExperimentConfig, world_size: int, vocab_size: int, precision: str,
                  capacity_bytes: Optional[int]) -> bool:
    """Print a warning to stderr when the estimate exceeds the GPU's usable memory; never
    raises. ``capacity_bytes`` None (no GPU) checks nothing. Returns whether it warned."""
    if capacity_bytes is None:
        return False
    est = estimate_memory(cfg, world_size, vocab_size, precision)
    if fits(est, capacity_bytes):
        return False
    print(f"warning: this run is estimated to need {est.total / GIB:.1f} GiB per GPU "
          f"(stage {est.stage}: weights {est.weights / GIB:.1f}, gradients "
          f"{est.gradients / GIB:.1f}, optimizer {est.optimizer / GIB:.1f}, activations "
          f"{est.activations / GIB:.1f}), more than the {usable_bytes(capacity_bytes) / GIB:.1f}"
          f" GiB usable of {capacity_bytes / GIB:.1f} GiB; it may run out of memory. Consider "
          "model.recompute=full, a smaller train.micro_batch_size, more TP/PP or "
          "parallel.use_distributed_optimizer=true (tools/estimate_memory.py).",
          file=sys.stderr, flush=True)
    return True
