"""Process groups and seeds: the parallel layout of a run, set up once per process."""
from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel

from megatron_srp import compat
from megatron_srp.config import ExperimentConfig


def initialize(cfg: ExperimentConfig) -> None:
    """Join the torchrun job (or a single-process one) and build TP/PP/DP groups."""
    compat.install()
    if not dist.is_initialized():
        compat.bind_local_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(minutes=10)
        if "WORLD_SIZE" in os.environ:  # torchrun (or another launcher) set up the job
            dist.init_process_group(backend=compat.backend(), timeout=timeout)
        else:  # a plain `python` run: a job of one, with an in-memory store and no port
            dist.init_process_group(backend=compat.backend(), store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
    p = cfg.parallel
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
    )
    seed_everything(cfg.train.seed)


def seed_everything(seed: int) -> None:
    """Same seed on every rank for data-parallel state; Megatron derives the TP-rank streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_logging_rank() -> bool:
    """The last pipeline stage, first TP and DP rank: where the loss is known."""
    return (mpu.is_pipeline_last_stage(ignore_virtual=True)
            and mpu.get_tensor_model_parallel_rank() == 0
            and mpu.get_data_parallel_rank() == 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
