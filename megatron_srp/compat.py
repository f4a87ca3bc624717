"""The one place that knows Megatron-Core was written for CUDA (and for Apex / TE).

Megatron-Core 0.16 hard-codes CUDA in a handful of places: ``device="cuda"`` and
``torch.cuda.current_device()`` for buffers (RoPE, pipeline p2p, optimizer scalars),
CUDA RNG state for the tensor-parallel RNG tracker, CUDA tensor type names in gradient
clipping, and CUDA streams in DDP. On a machine without a GPU, :func:`install` maps all of
that onto the CPU so the *same* training code runs with the gloo backend, TP and PP included.
On a CUDA machine it only picks the device. Nothing else in the project branches on the device:
it asks this module (``device()``, ``backend()``, ``synchronize()``, ``peak_memory_bytes()``,
``device_memory_bytes()``).

Megatron-Core also assumes Apex or Transformer Engine for the optimizer. Without them it falls
back to torch Adam, whose per-parameter ``step`` the distributed optimizer's checkpoint code
half-handles; :func:`prepare_optimizer_for_load` and a one-line guard installed by
:func:`install` make that path load checkpoints, on CPU and on a GPU host without Apex/TE.
"""
from __future__ import annotations

import contextlib
import logging
import os
import resource
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE: Optional["_CudaToCpu"] = None  # the active device-rewriting mode on a CPU machine


def has_cuda() -> bool:
    """True when a usable CUDA device is present (the fast path; nothing is patched)."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend() -> str:
    """The torch.distributed backend that matches :func:`device`."""
    return "nccl" if has_cuda() else "gloo"


def bind_local_device(local_rank: int) -> None:
    """Pin this rank to its GPU (no-op on CPU)."""
    if has_cuda():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def synchronize() -> None:
    """Wait for queued device work, so timings mean something."""
    if has_cuda():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    if has_cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes() -> int:
    """Peak device memory on GPU; peak resident set size of this process on CPU."""
    if has_cuda():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_memory_bytes() -> Optional[int]:
    """Total memory of this process's GPU (None on CPU), what a run's estimate must fit in."""
    if has_cuda():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


def device_rng_state() -> Optional[torch.Tensor]:
    """The GPU generator's state (None on CPU, where torch's CPU state covers everything)."""
    return torch.cuda.get_rng_state() if has_cuda() else None


def set_device_rng_state(state: Optional[torch.Tensor]) -> None:
    if state is not None and has_cuda():
        torch.cuda.set_rng_state(state)


def device_name() -> str:
    if has_cuda():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def device_capability() -> tuple[int, int] | None:
    """Compute capability (9, 0) for Hopper; None without a GPU."""
    if has_cuda():
        return torch.cuda.get_device_capability()
    return None


def transformer_config_overrides() -> dict[str, Any]:
    """TransformerConfig fields that depend on the device/backend.

    * ``batch_p2p_comm``: Megatron batches pipeline sends and receives; with PP=2 a rank's
      previous and next stage are the same peer, and gloo matches the batched ops in posting
      order, which differs between the two ranks (activations land in gradient buffers).
      Megatron's non-batched even/odd protocol keeps the order, so gloo uses that.
    * ``deallocate_pipeline_outputs`` frees activations early on GPU, a saving that CPU
      runs do not need.
    """
    cuda = has_cuda()
    return {"batch_p2p_comm": cuda, "deallocate_pipeline_outputs": cuda}


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    # An int device means a CUDA ordinal in torch's factory functions.
    return isinstance(value, int) and not isinstance(value, bool)


_CPU = torch.device("cpu")


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls (and ``Tensor.cuda()``) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron asserts on names like 'torch.cuda.FloatTensor'; report what CUDA would.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros) and args:
            args = tuple(_CPU if (i > 0 and _is_cuda_device(a) and not isinstance(a, torch.dtype))
                         else a for i, a in enumerate(args))
        return func(*args, **kwargs)


def _cpu_rng_state(device: Any = "cuda", *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


class _NullStream:
    """Stands in for torch.cuda.Stream: work on CPU is already in order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _has_fused_adam() -> bool:
    from megatron.core.optimizer import distrib_optimizer
    return bool(getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False))


def _torch_adams(optimizer):
    """The torch optimizers inside a Megatron (possibly chained) optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield inner


def prepare_optimizer_for_load(optimizer) -> None:
    """Give a fresh torch Adam the state entries a checkpoint load will overwrite.

    Without Apex/TE, Megatron's distributed optimizer reads ``step`` from torch Adam's
    per-parameter state while building the loading state dict, and a fresh Adam has none.
    """
    if _has_fused_adam():
        return
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st.setdefault("exp_avg", torch.zeros_like(p.data))
                    st.setdefault("exp_avg_sq", torch.zeros_like(p.data))


def finish_optimizer_load(optimizer) -> None:
    """Give every parameter its own ``step`` tensor after a load.

    Megatron's loader assigns one shared ``step`` tensor to all of torch Adam's parameter
    states, and torch keeps it shared, so each optimizer step would advance it once per
    parameter and corrupt Adam's bias correction for the rest of the run.
    """
    if _has_fused_adam():
        return
    for inner in _torch_adams(optimizer):
        for st in inner.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].detach().clone()


def _guard_torch_adam_step() -> None:
    """Loading ``fully_reshardable`` optimizer state copies every per-parameter state key,
    but torch Adam's ``step`` is restored separately (from the common state) and is not in
    the loaded tensors; keep the restored value instead of failing on the missing key."""
    if _has_fused_adam():
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_srp_guarded", False):
        return

    def guarded(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state.get(main_param, {})
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    guarded._srp_guarded = True
    DistributedOptimizer._set_main_param_and_optimizer_states = guarded


def install() -> None:
    """Make Megatron-Core's CUDA (and Apex/TE) assumptions hold here. Idempotent.

    Call once per process before Megatron-Core builds anything (the trainer does).
    """
    global _INSTALLED
    if _INSTALLED:
        return
    _guard_torch_adam_step()
    if has_cuda():
        _INSTALLED = True
        return
    from megatron.core.tensor_parallel import random as mcore_random

    # A device object rather than an ordinal: Megatron's autograd Functions call
    # ``torch.empty(..., device=torch.cuda.current_device())`` inside backward, where the
    # function mode below is not active (torch pops modes while a handled call runs).
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.random.get_rng_state = _cpu_rng_state
    torch.cuda.Stream = _NullStream
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    mcore_random._get_cuda_rng_state = _cpu_rng_state
    # Here the "CUDA" RNG the tracker forks *is* the CPU RNG, so its check that the CPU RNG
    # did not move inside a fork fires on every fork; drop that one message.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())
    global _MODE
    _MODE = _CudaToCpu()
    _MODE.__enter__()
    _INSTALLED = True


@contextlib.contextmanager
def device_clean():
    """Run a block without the CUDA-to-CPU rewriting of every torch call.

    The rewriting costs a Python call per torch op. Megatron's inference forward pass asks only
    ``torch.cuda.current_device()`` (patched above) for its buffers, so generation runs its
    forward passes in this block, a third faster on a small model. No-op on a GPU.
    """
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if _MODE is None or _get_current_function_mode() is not _MODE:
        yield
        return
    with _pop_mode_temporarily():
        yield
