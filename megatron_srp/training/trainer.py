"""The pretraining run, top to bottom: validate, set up, resume, loop, save.

Reading order: ``pretrain`` below is the whole story; each step it takes lives in a small module
of this package (parallel, optim, step, checkpoint, logger, metrics) or in ``megatron_srp.model``
and ``megatron_srp.data``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state as mpu

from megatron_srp import compat
from megatron_srp.config import ExperimentConfig, config_hash, to_dict, to_yaml
from megatron_srp.data.curriculum import BlendMonitor, phase_summary
from megatron_srp.data.gpt_data import BatchPlan, build_datasets, microbatches
from megatron_srp.model.init import layout_invariant_init
from megatron_srp.model.provider import build_model_chunks
from megatron_srp.model.specs import choose_backend
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir
from megatron_srp.training import checkpoint as ckpt
from megatron_srp.training import memory, parallel
from megatron_srp.training.logger import RunLogger
from megatron_srp.training.metrics import Stopwatch, Throughput
from megatron_srp.training.optim import (
    build_optimizer, connect_schedule_hooks, reload_main_params, wrap_ddp,
)
from megatron_srp.training.pretrained import pretrained_start
from megatron_srp.training.step import TimedIterator, eval_step, train_step
from megatron_srp.training.stopping import StopWatch, die_with_parent, record_stop
from megatron_srp.validation import Platform, resolved_precision, validate


@dataclass
class TrainResult:
    final_iteration: int
    losses: dict[int, float] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    stopped: Optional[str] = None  # why the run ended before train_iters (a signal, the budget)


def load_run_tokenizer(cfg: ExperimentConfig) -> SRPTokenizer:
    """The tokenizer named in the config, else the one saved beside the first dataset.

    Every dataset must have been built with a tokenizer of the same fingerprint.
    """
    from megatron_srp.data.preprocess import read_dataset_meta
    prefixes = cfg.data.prefixes()
    metas = [read_dataset_meta(p) for p in prefixes]
    if cfg.data.tokenizer:
        tok_dir = cfg.data.tokenizer
    else:
        beside = Path(prefixes[0] + ".tokenizer")
        tok_dir = str(beside) if beside.is_dir() else str(default_tokenizer_dir())
    tokenizer = SRPTokenizer.from_dir(tok_dir)
    for prefix, meta in zip(prefixes, metas):
        fp = meta.get("tokenizer", {}).get("fingerprint")
        if fp is not None and fp != tokenizer.fingerprint:
            raise ValueError(f"data: {prefix} was tokenized with tokenizer {fp}, but the run "
                             f"uses {tokenizer.fingerprint} ({tok_dir}); re-run preprocessing")
    return tokenizer


def build_training_state(cfg: ExperimentConfig, vocab_size: int, precision: str,
                         platform: Platform):
    """This rank's model chunks (initialised, DDP-wrapped), optimizer and LR schedule."""
    chunks = build_model_chunks(cfg, vocab_size, precision, platform.has_cuda)
    shape = cfg.model.shape()
    layout_invariant_init(chunks, cfg.train.seed, shape.init_method_std, shape.num_layers,
                          compat.device())
    model = wrap_ddp(chunks, cfg, platform.has_cuda)
    optimizer, scheduler = build_optimizer(model, cfg, precision)
    connect_schedule_hooks(model, optimizer)
    return model, optimizer, scheduler


class PretrainData:
    """The pretraining samples: Megatron's GPTDatasets behind the curriculum, and the blend
    monitor that logs what the run reads. (Finetuning has its own: training/finetune.py.)"""

    def __init__(self, cfg: ExperimentConfig, tokenizer: SRPTokenizer, save_dir: Optional[str]):
        cache_dir = cfg.data.cache_dir or (str(Path(save_dir) / "data_cache") if save_dir else None)
        rank0 = dist.get_rank() == 0
        if rank0:  # rank 0 builds Megatron's index cache; the others then read it
            self.train, self.valid = build_datasets(cfg, tokenizer, cache_dir)
        dist.barrier()
        if not rank0:
            self.train, self.valid = build_datasets(cfg, tokenizer, cache_dir)
        self.window = cfg.data.blend_window
        self.facts: dict = {}

    def monitor(self, consumed: int) -> BlendMonitor:
        return BlendMonitor(self.train, self.window, consumed)

    def describe(self, monitor: BlendMonitor) -> str:
        names = dict(zip(self.train.prefixes, monitor.names))
        return (f"data: {len(self.train):,} training samples in {len(self.train.plans)} "
                f"phase(s)\n" + phase_summary(self.train.plans, names))


def pretrain(cfg: ExperimentConfig, platform: Optional[Platform] = None) -> TrainResult:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    platform = platform or Platform.detect()
    validate(cfg, world_size, platform)  # before any process group, model or file
    precision = resolved_precision(cfg, platform)
    tokenizer = load_run_tokenizer(cfg)
    init = pretrained_start(cfg, tokenizer)  # continued pretraining: its weights, checked

    parallel.initialize(cfg)
    try:
        if dist.get_rank() == 0:  # before the model exists: warn, never stop, if it cannot fit
            memory.warn_if_short(cfg, world_size, tokenizer.vocab_size, precision,
                                 compat.device_memory_bytes())
        return train_loop(cfg, tokenizer, precision, platform, PretrainData, init_weights=init)
    finally:
        ckpt.stop_writer_processes()
        parallel.destroy()


def train_loop(cfg: ExperimentConfig, tokenizer: SRPTokenizer, precision: str,
               platform: Platform, make_data, init_weights: Optional[Path] = None
               ) -> TrainResult:
    """Build, resume, train, evaluate and save: the loop pretraining and finetuning share.

    ``make_data(cfg, tokenizer, save_dir)`` gives the samples (``.train``, ``.valid``, a
    ``.monitor(consumed)`` that logs what is read, ``.describe(monitor)``, ``.facts`` for
    run.json). ``init_weights``: a checkpoint whose weights a fresh run starts from (a resumed
    run loads its own checkpoint instead).
    """
    t, save_dir = cfg.train, cfg.checkpoint.save
    rank0 = dist.get_rank() == 0
    if "LOCAL_RANK" in os.environ:  # under torchrun: die with the launcher, never train on
        die_with_parent()
    model, optimizer, scheduler = build_training_state(cfg, tokenizer.vocab_size, precision,
                                                       platform)
    shape = cfg.model.shape()

    progress = ckpt.Progress()
    resume_from = ckpt.resolve_resume(cfg.checkpoint.load, save_dir)
    if resume_from is not None:
        progress = ckpt.load(resume_from, model, optimizer, scheduler, cfg, tokenizer.vocab_size)
    elif init_weights is not None:
        ckpt.load_model_only(init_weights, model, cfg, tokenizer.vocab_size)
        reload_main_params(optimizer)

    if save_dir and rank0:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save(Path(save_dir) / "tokenizer")
        (Path(save_dir) / "config.yaml").write_text(to_yaml(cfg))
    data = make_data(cfg, tokenizer, save_dir)
    train_ds, valid_ds = data.train, data.valid

    dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    plan = BatchPlan(t.global_batch_size, t.micro_batch_size, dp, dp_rank)
    n_chunks = len(model)
    tb_dir = cfg.logging.tensorboard_dir or (str(Path(save_dir) / "tensorboard") if save_dir else None)
    log = RunLogger(parallel.is_logging_rank(), t.train_iters, progress.iteration, save_dir, tb_dir,
                    cfg.logging.wandb_project, cfg.name, cfg.logging.progress_bar, to_dict(cfg))
    throughput = Throughput(shape, t.seq_length, tokenizer.vocab_size,
                            dist.get_world_size(), compat.device_name())
    log.info(f"run {cfg.name} ({config_hash(cfg)}): {shape.num_parameters(tokenizer.vocab_size):,}"
             f" parameters, {precision}, TP={cfg.parallel.tensor_model_parallel_size} "
             f"PP={cfg.parallel.pipeline_model_parallel_size} DP={dp}, "
             f"{plan.num_microbatches} microbatches/step, starting at step {progress.iteration}")

    if resume_from is not None:
        log.info(f"resumed from {resume_from}")
    elif init_weights is not None:
        log.info(f"weights from {init_weights}; fresh optimizer and LR schedule")
    monitor = data.monitor(progress.consumed_train_samples)
    log.info(data.describe(monitor))

    run_facts = {"precision": precision,
                 "layer_backend": choose_backend(cfg.model.layer_spec, platform.has_cuda),
                 "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint},
                 **data.facts}
    result = TrainResult(progress.iteration)
    tokens_per_step = t.global_batch_size * t.seq_length
    interval_tokens, interval_data_s, interval_step_s = 0, 0.0, 0.0
    watch = Stopwatch()
    stopper = StopWatch(t.exit_signals, t.exit_duration_minutes)
    if save_dir:
        with stopper.ignored():  # so that the stop signal cannot kill the stop's own save
            ckpt.start_helper_processes()
    step_seconds: list[float] = []
    compat.reset_peak_memory()
    for step in range(progress.iteration, t.train_iters):
        for message in monitor.advance(step * t.global_batch_size, t.global_batch_size):
            log.info(message)
        iters = [TimedIterator(microbatches(train_ds, plan, step)) for _ in range(n_chunks)]
        watch.lap()
        stats = train_step(model, optimizer, scheduler, iters[0] if n_chunks == 1 else iters,
                           plan.num_microbatches, t.seq_length, t.micro_batch_size)
        compat.synchronize()
        step_s = watch.lap()
        step_seconds.append(step_s)
        progress.iteration = step + 1
        progress.consumed_train_samples += t.global_batch_size
        interval_tokens += tokens_per_step
        interval_step_s += step_s
        interval_data_s += sum(it.seconds for it in iters)
        result.losses[progress.iteration] = stats["loss"]
        at_interval = progress.iteration % cfg.logging.log_interval == 0
        metrics = {"loss": stats["loss"], "lr": scheduler.get_lr(optimizer.param_groups[0]),
                   "grad_norm": stats["grad_norm"], "step_time_s": step_s}
        if at_interval or progress.iteration == t.train_iters:
            # Throughput over the steps' own time: evaluation and saving are not counted.
            metrics.update(throughput(interval_tokens, interval_step_s))
            metrics["data_time_s"] = interval_data_s
            metrics["peak_mem_gb"] = compat.peak_memory_bytes() / 2**30
            metrics.update(monitor.metrics())
            interval_tokens, interval_data_s, interval_step_s = 0, 0.0, 0.0
        log.step(progress.iteration, metrics, console=at_interval)

        if valid_ds is not None and t.eval_interval \
                and progress.iteration % t.eval_interval == 0:
            _evaluate(model, valid_ds, plan, progress, cfg, log)
        last = progress.iteration == t.train_iters
        interval = cfg.checkpoint.save_interval
        saved = bool(save_dir and (last or (interval and progress.iteration % interval == 0)))
        stop = None if last else stopper.should_stop(
            _seconds_to_next_save(progress.iteration, interval, t.train_iters, step_seconds))
        if save_dir and (saved or stop):
            path = ckpt.save(save_dir, progress, model, optimizer, scheduler, cfg,
                             tokenizer.vocab_size, cfg.checkpoint.keep_last, run_facts)
            log.info(f"saved checkpoint {path}")
            result.checkpoint = str(path)
        if stop:
            log.info(f"stopped at step {progress.iteration} of {t.train_iters} ({stop}); "
                     f"rerun the same command to resume")
            result.stopped = stop
            if rank0:
                record_stop(stop, progress.iteration, result.checkpoint)
            break
    stopper.restore()
    result.final_iteration = progress.iteration
    log.close()
    return result


def _seconds_to_next_save(iteration: int, interval: int, train_iters: int,
                          step_seconds: list[float]) -> float:
    """How long until the next regular save (or the end), at the recent step time."""
    recent = step_seconds[-10:]
    per_step = sum(recent) / len(recent) if recent else 0.0
    next_save = train_iters if not interval else min(
        train_iters, (iteration // interval + 1) * interval)
    return (next_save - iteration) * per_step


def _evaluate(model, valid_ds, plan: BatchPlan, progress: ckpt.Progress,
              cfg: ExperimentConfig, log: RunLogger) -> None:
    t = cfg.train
    losses = []
    eval_index = progress.consumed_valid_samples // t.global_batch_size
    for i in range(t.eval_iters):
        it = [microbatches(valid_ds, plan, eval_index + i, wrap=True) for _ in range(len(model))]
        losses.append(eval_step(model, it[0] if len(model) == 1 else it,
                                plan.num_microbatches, t.seq_length, t.micro_batch_size))
    progress.consumed_valid_samples += t.eval_iters * t.global_batch_size
    val = sum(losses) / len(losses)
    log.record(progress.iteration, {"loss": val}, "valid")
    log.info(f"step {progress.iteration:>6} | validation loss {val:.4f}")
