"""Megatron DDP wrapping, the Megatron optimizer (AdamW, optionally ZeRO-1) and its LR schedule."""
from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel as DDP
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_srp.config import ExperimentConfig


def wrap_ddp(chunks, cfg: ExperimentConfig, has_cuda: bool) -> list[DDP]:
    """Megatron DDP: contiguous gradient buffers, reduce-scatter for the distributed optimizer,
    gradient reduction overlapped with backward on GPU (on CPU gloo gains nothing from it)."""
    p = cfg.parallel
    overlap = has_cuda if p.overlap_grad_reduce is None else p.overlap_grad_reduce
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=True,
        bucket_size=None if not overlap else 40_000_000,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DDP(config=chunk.config, ddp_config=ddp_config, module=chunk,
                           # Only the first chunk may skip bucketing (as in Megatron-LM).
                           disable_bucketing=i > 0))
    return wrapped


def build_optimizer(model: list[DDP], cfg: ExperimentConfig, precision: str):
    t = cfg.train
    bf16 = precision in ("bf16", "fp8")
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=model[0].module.config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_iters,
        lr_decay_steps=t.lr_decay_iters or t.train_iters,
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def connect_schedule_hooks(model: list[DDP], optimizer) -> None:
    """Tell Megatron's pipeline schedule how to sync and finalise gradients for these chunks."""
    config = model[0].module.config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if model[0].ddp_config.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        sync = [m.start_grad_sync for m in model]
        config.grad_sync_func = sync[0] if len(model) == 1 else sync


def reload_main_params(optimizer) -> None:
    """After weights were loaded into the model (finetuning from a pretrained checkpoint), copy
    them into the optimizer's fp32 main parameters, which were taken at construction; a no-op
    for an fp32 optimizer, whose main parameters are the model's."""
    optimizer.reload_model_params()
