"""Distributed checkpoints that are either complete or invisible.

Layout under ``<save>/``::

    iter_0000200/            Megatron dist_checkpointing shards + run.json (shape, progress)
    iter_0000200.partial/    a save in progress (never loaded; removed by the next save)
    latest                   text file naming the newest *complete* checkpoint
    tokenizer/               the run's tokenizer, so ids can never drift

A save writes into ``iter_N.partial``, waits for every rank, renames it to ``iter_N`` and only
then rewrites ``latest`` (atomically, via ``os.replace``). A run killed at any point of a save
therefore resumes from the previous complete checkpoint. The optimizer state is stored in
Megatron's ``fully_reshardable`` format by default, which any TP/PP/DP layout can load.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as mpu
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy

from megatron_srp import compat
from megatron_srp.config import ExperimentConfig, to_dict

LATEST = "latest"
RUN_FILE = "run.json"
# Test hook: exit hard after the shards are written but before the checkpoint is committed.
CRASH_ENV = "SRP_CRASH_DURING_SAVE_AT"


class CheckpointError(RuntimeError):
    pass


@dataclass
class Progress:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_checkpoint(root: str | os.PathLike | None) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None."""
    if root is None:
        return None
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / RUN_FILE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def run_finished(root: str | os.PathLike) -> bool:
    """Whether the run saving to ``root`` is done: its latest complete checkpoint is its last
    step (pipelines use it to skip a training run they already finished)."""
    try:
        path = latest_checkpoint(root)
    except CheckpointError:
        return False
    if path is None:
        return False
    run = read_run(path)
    return run["progress"]["iteration"] >= run["config"]["train"]["train_iters"]


def resolve_resume(load: Optional[str], save: Optional[str]) -> Optional[Path]:
    """``load`` may be a run directory (its latest complete checkpoint) or one checkpoint;
    without it, a run resumes from its own ``save`` directory when that holds a checkpoint."""
    if load is None:
        return latest_checkpoint(save)
    return resolve_checkpoint(load)


def resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """The checkpoint directory to load: a run directory's latest complete checkpoint, or the
    given ``iter_N`` directory itself. Raises :class:`CheckpointError` with the reason."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory (give a run directory "
                              f"or one of its iter_N checkpoints)")
    if path.name.endswith(".partial"):
        raise CheckpointError(f"{path} is an unfinished save, not a checkpoint; give its run "
                              f"directory {path.parent} to load the latest complete one")
    found = latest_checkpoint(path)
    if found is not None:
        return found
    if (path / RUN_FILE).is_file():
        return path
    if path.name.startswith("iter_"):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {RUN_FILE})")
    raise CheckpointError(
        f"no checkpoint in {path}: expected a run directory with a '{LATEST}' file "
        f"(checkpoint.save of a finished run) or an iter_N directory holding {RUN_FILE}")


def _unwrap(chunk):
    """The GPTModel inside a DDP wrapper: checkpoints hold the model's own keys."""
    return getattr(chunk, "module", chunk)


def _model_state(model, prefix_chunks: bool) -> dict:
    if not prefix_chunks:
        return {"model": _unwrap(model[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(m).sharded_state_dict() for i, m in enumerate(model)}


def _load_model_weights(model, loaded: dict) -> None:
    if len(model) == 1:
        _unwrap(model[0]).load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(model):
            _unwrap(m).load_state_dict(loaded[f"model{i}"])


def _rng_state() -> ShardedObject:
    """RNG state per (PP, TP) position, replicated over DP so a new DP size can load it."""
    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if compat.device_rng_state() is not None:
        state["device"] = compat.device_rng_state()
    pp, tp = mpu.get_pipeline_model_parallel_rank(), mpu.get_tensor_model_parallel_rank()
    return ShardedObject("rng_state", state,
                         (mpu.get_pipeline_model_parallel_world_size(),
                          mpu.get_tensor_model_parallel_world_size()),
                         (pp, tp), replica_id=mpu.get_data_parallel_rank())


def _opt_metadata(cfg: ExperimentConfig) -> dict:
    return {"distrib_optim_sharding_type": cfg.checkpoint.optimizer_format}


def _full_state(model, optimizer, scheduler, cfg: ExperimentConfig, is_loading: bool) -> dict:
    if is_loading:
        compat.prepare_optimizer_for_load(optimizer)
    state = _model_state(model, prefix_chunks=len(model) > 1)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                      metadata=_opt_metadata(cfg))
    state["scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_state()
    return state


def _describe_model(cfg: ExperimentConfig, vocab_size: int) -> dict:
    return {**asdict(cfg.model.shape()), "vocab_size": vocab_size}


def start_helper_processes() -> None:
    """Start the process that Megatron-Core's checkpoint writers report to (a spawned
    multiprocessing manager, otherwise started lazily by the first save) now, so the caller
    chooses the signals it inherits (see ``StopWatch.ignored``), and so that it dies with this
    rank: torchrun starts each rank in a session of its own, so a SIGKILLed job's process group
    does not reach the manager, and a manager that ignores the stop signals would otherwise
    outlive a killed rank for good. Does nothing once the manager runs."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_srp.training.stopping import die_with_parent

    if getattr(filesystem_async, "_results_queue", True) is not None:  # running, or renamed
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent)
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager


def save(root: str, progress: Progress, model, optimizer, scheduler,
         cfg: ExperimentConfig, vocab_size: int, keep_last: int,
         run_facts: Optional[dict] = None) -> Path:
    """Write checkpoint ``progress.iteration``; ``run_facts`` (precision, layer backend,
    tokenizer fingerprint) go into run.json so loaders need not guess them."""
    final = iteration_dir(root, progress.iteration)
    partial = final.with_name(final.name + ".partial")
    rank0 = dist.get_rank() == 0
    if rank0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    start_helper_processes()  # a no-op when the run started it already
    state = _full_state(model, optimizer, scheduler, cfg, is_loading=False)
    dist_checkpointing.save(state, str(partial), content_metadata=_opt_metadata(cfg))
    dist.barrier()
    if os.environ.get(CRASH_ENV) == str(progress.iteration):
        stop_writer_processes()  # the simulated crash should not leak a real process
        os._exit(17)
    if rank0:
        run = {"progress": asdict(progress), "model": _describe_model(cfg, vocab_size),
               **(run_facts or {}), "config": to_dict(cfg)}
        (partial / RUN_FILE).write_text(json.dumps(run, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = Path(root) / (LATEST + ".tmp")
        tmp.write_text(final.name + "\n")
        os.replace(tmp, Path(root) / LATEST)
        _prune(Path(root), keep_last)
    dist.barrier()
    return final


def save_weights_only(root: str | os.PathLike, model, cfg: ExperimentConfig, vocab_size: int,
                      run_facts: dict) -> Path:
    """Write ``iter_0000000`` holding the model's weights and no optimizer state (an imported
    model): runs start from it with ``checkpoint.pretrained``; resuming it is refused. One
    process (TP=1, PP=1); committed the same way as :func:`save`."""
    final = iteration_dir(root, 0)
    partial = final.with_name(final.name + ".partial")
    partial.mkdir(parents=True)
    dist_checkpointing.save(_model_state(model, prefix_chunks=len(model) > 1), str(partial))
    run = {"progress": asdict(Progress()), "model": _describe_model(cfg, vocab_size),
           "weights_only": True, **run_facts, "config": to_dict(cfg)}
    (partial / RUN_FILE).write_text(json.dumps(run, indent=2))
    os.replace(partial, final)
    (Path(root) / LATEST).write_text(final.name + "\n")
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("iter_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def stop_writer_processes() -> None:
    """Megatron's checkpoint writer starts a multiprocessing Manager (for its results queue) at
    the first save and never stops it; stop it so a finished run leaves no process behind."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    queue = getattr(filesystem_async, "_results_queue", None)
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
    filesystem_async._results_queue = None


def read_run(path: Path) -> dict:
    try:
        return json.loads((path / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path / RUN_FILE}: {exc}") from exc


def check_compatible(path: Path, cfg: ExperimentConfig, vocab_size: int) -> None:
    """Refuse, with the differing fields named, a checkpoint of another model shape."""
    saved = read_run(path)["model"]
    wanted = _describe_model(cfg, vocab_size)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {wanted[k]!r}"
             for k in wanted if k not in ("init_method_std", "max_position_embeddings")
             and saved.get(k) != wanted[k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} does not match the configured model: "
                              + "; ".join(diffs))


def load(path: Path, model, optimizer, scheduler, cfg: ExperimentConfig,
         vocab_size: int) -> Progress:
    if read_run(path).get("weights_only"):
        raise CheckpointError(f"{path} holds weights only (an imported model), no optimizer "
                              f"state to resume; start a run from it with "
                              f"checkpoint.pretrained={path.parent}")
    check_compatible(path, cfg, vocab_size)
    state = _full_state(model, optimizer, scheduler, cfg, is_loading=True)
    loaded = dist_checkpointing.load(state, str(path),
                                     sharded_strategy=get_default_load_sharded_strategy(str(path)))
    _load_model_weights(model, loaded)
    optimizer.load_state_dict(loaded["optimizer"])
    compat.finish_optimizer_load(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    rng = loaded["rng_state"]
    random.setstate(rng["random"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    compat.set_device_rng_state(rng.get("device"))
    return Progress(**read_run(path)["progress"])


def load_model_only(path: Path, model, cfg: ExperimentConfig, vocab_size: int) -> Progress:
    """Weights only (for sampling, evaluation and export)."""
    check_compatible(path, cfg, vocab_size)
    state = _model_state(model, prefix_chunks=len(model) > 1)
    loaded = dist_checkpointing.load(state, str(path))
    _load_model_weights(model, loaded)
    return Progress(**read_run(path)["progress"])
