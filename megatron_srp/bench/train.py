"""Measure training throughput for a preset and layout, without a dataset.

Runs the real training step (Megatron schedule, DDP, optimizer) on random tokens, so the figures
are those of ``pretrain`` minus data loading. Warm-up steps are discarded; the timed steps give
tokens/s, TFLOP/s per device, MFU (see ``metrics.py`` for the formula) and peak memory.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from megatron_srp import compat
from megatron_srp.config import ExperimentConfig
from megatron_srp.data.gpt_data import BatchPlan
from megatron_srp.training import parallel
from megatron_srp.training.metrics import Stopwatch, Throughput
from megatron_srp.training.step import train_step
from megatron_srp.validation import Platform, resolved_precision, validate


@dataclass
class BenchResult:
    preset: str
    precision: str
    layout: str
    recompute: str
    world_size: int
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    device: str
    timed_steps: int
    step_time_s: float
    step_time_std_s: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float
    peak_memory_gb: float
    final_loss: float


def _random_batches(plan: BatchPlan, seq_length: int, vocab_size: int, step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    for _ in range(plan.num_microbatches):
        tokens = torch.randint(0, vocab_size, (plan.micro_batch_size, seq_length + 1), generator=gen)
        yield {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
               "loss_mask": torch.ones(plan.micro_batch_size, seq_length),
               "position_ids": torch.arange(seq_length).expand(plan.micro_batch_size, -1)}


def benchmark(cfg: ExperimentConfig, warmup_steps: int, timed_steps: int,
              vocab_size: Optional[int] = None, peak_tflops: Optional[float] = None,
              platform: Optional[Platform] = None) -> Optional[BenchResult]:
    """Run and time training steps; returns the result on the logging rank, None elsewhere."""
    from megatron_srp.training.trainer import build_training_state

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    platform = platform or Platform.detect()
    cfg.train.train_iters = max(cfg.train.train_iters, warmup_steps + timed_steps + 1)
    cfg.train.warmup_iters = min(cfg.train.warmup_iters, cfg.train.train_iters - 1)
    validate(cfg, world_size, platform, require_data=False)
    precision = resolved_precision(cfg, platform)
    shape = cfg.model.shape()
    vocab = vocab_size or shape.vocab_size
    t = cfg.train

    parallel.initialize(cfg)
    try:
        model, optimizer, scheduler = build_training_state(cfg, vocab, precision, platform)
        plan = BatchPlan(t.global_batch_size, t.micro_batch_size,
                         mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank())
        throughput = Throughput(shape, t.seq_length, vocab, dist.get_world_size(),
                                compat.device_name(), peak_tflops)
        times, loss = [], float("nan")
        watch = Stopwatch()
        for step in range(warmup_steps + timed_steps):
            if step == warmup_steps:
                compat.reset_peak_memory()
            iters = [_random_batches(plan, t.seq_length, vocab, step) for _ in model]
            compat.synchronize()
            watch.lap()
            stats = train_step(model, optimizer, scheduler, iters[0] if len(model) == 1 else iters,
                               plan.num_microbatches, t.seq_length, t.micro_batch_size)
            compat.synchronize()
            if step >= warmup_steps:
                times.append(watch.lap())
            loss = stats["loss"]
        peak = torch.tensor([compat.peak_memory_bytes()], dtype=torch.float64, device=compat.device())
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if not parallel.is_logging_rank():
            return None
        mean = statistics.mean(times)
        rates = throughput(t.global_batch_size * t.seq_length, mean)
        p = cfg.parallel
        layout = (f"TP{p.tensor_model_parallel_size}-PP{p.pipeline_model_parallel_size}"
                  + (f"x{p.virtual_pipeline_model_parallel_size}"
                     if p.virtual_pipeline_model_parallel_size else "")
                  + f"-DP{mpu.get_data_parallel_world_size()}"
                  + ("-SP" if p.sequence_parallel else ""))
        return BenchResult(
            preset=cfg.model.preset, precision=precision, layout=layout,
            recompute=cfg.model.recompute, world_size=dist.get_world_size(),
            seq_length=t.seq_length, global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size, device=compat.device_name(),
            timed_steps=timed_steps, step_time_s=mean,
            step_time_std_s=statistics.pstdev(times) if len(times) > 1 else 0.0,
            tokens_per_s=rates["tokens_per_s"], tflops_per_device=rates["tflops_per_device"],
            mfu=rates["mfu"], peak_memory_gb=float(peak.item()) / 2**30, final_loss=loss)
    finally:
        parallel.destroy()


def as_markdown_row(r: BenchResult) -> str:
    mfu = "n/a" if r.mfu != r.mfu else f"{100 * r.mfu:.1f}%"
    return (f"| {r.preset} | {r.layout} | {r.precision} | {r.recompute} | {r.seq_length} | "
            f"{r.global_batch_size}/{r.micro_batch_size} | {r.tokens_per_s:,.0f} | "
            f"{r.tflops_per_device:.2f} | {mfu} | {r.peak_memory_gb:.2f} | {r.device} |")


def to_dict(r: BenchResult) -> dict:
    return asdict(r)
