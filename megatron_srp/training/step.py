"""One training or evaluation step through Megatron's pipeline schedules."""
from __future__ import annotations

import time
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_srp import compat


class TimedIterator:
    """Counts the seconds spent producing batches (the data-loading time in the logs)."""

    def __init__(self, it: Iterator[dict]):
        self.it = it
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t0


def _masked_mean_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.view(-1).float()
    loss = torch.sum(per_token_loss.view(-1).float() * mask) / mask.sum().clamp(min=1.0)
    # clone: the schedule divides the returned loss in place by the number of microbatches
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    """Megatron's forward_step contract: returns (output, loss_fn)."""
    batch = next(data_iterator)
    dev = compat.device()
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    loss_mask = batch["loss_mask"].to(dev, non_blocking=True)
    position_ids = batch["position_ids"].to(dev, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)

    def loss_fn(output_tensor):
        return _masked_mean_loss(loss_mask, output_tensor)

    return output, loss_fn


def _mean_loss(loss_dicts: list[dict]) -> float:
    """Average the micro-batch losses, then over data-parallel ranks (last stage only)."""
    if not mpu.is_pipeline_last_stage(ignore_virtual=True) or not loss_dicts:
        return float("nan")
    value = torch.stack([d["lm loss"] for d in loss_dicts]).mean().reshape(1)
    dist.all_reduce(value, group=mpu.get_data_parallel_group())
    return float(value.item()) / mpu.get_data_parallel_world_size()


def run_schedule(model, data_iter, num_microbatches: int, seq_length: int,
                 micro_batch_size: int, forward_only: bool) -> list[dict]:
    """``data_iter`` is one iterator, or one per model chunk with virtual pipeline stages."""
    schedule = get_forward_backward_func()
    return schedule(
        forward_step_func=forward_step,
        data_iterator=data_iter,
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(model, optimizer, scheduler, data_iter, num_microbatches: int,
               seq_length: int, micro_batch_size: int) -> dict[str, float]:
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(model, data_iter, num_microbatches, seq_length, micro_batch_size,
                          forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return {"loss": _mean_loss(losses), "grad_norm": float(grad_norm or 0.0),
            "skipped": 0.0 if ok else 1.0}


@torch.no_grad()
def eval_step(model, data_iter, num_microbatches: int, seq_length: int,
              micro_batch_size: int) -> float:
    for chunk in model:
        chunk.eval()
    try:
        losses = run_schedule(model, data_iter, num_microbatches, seq_length, micro_batch_size,
                              forward_only=True)
    finally:
        for chunk in model:
            chunk.train()
    return _mean_loss(losses)
