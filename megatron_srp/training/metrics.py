"""What a step cost: FLOPs, MFU, throughput, and where the numbers are written.

FLOPs per token (forward) for a Llama-shaped GPT with L layers, hidden h, KV width k
(= query groups x head dim), FFN width f, vocabulary V, sequence s::

    L * (2h(h + 2k)  +  4sh  +  2h^2  +  6hf)  +  2hV
         QKV proj    scores+AV  out proj  SwiGLU    logits

Training counts 3x the forward (backward is two matmuls per forward matmul). Activation
recomputation is *not* counted, so this is model FLOPs utilisation (MFU), the convention of
PaLM and Megatron-LM: MFU = achieved model FLOP/s / (number of GPUs x peak dense bf16 FLOP/s).
"""
from __future__ import annotations

import math
import time
from typing import Optional

from megatron_srp.presets import ModelShape

# Dense bf16 peak per device (TFLOP/s), from the vendors' datasheets (no sparsity).
PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
    "H200": 989.4, "GH200": 989.4, "B200": 2250.0, "A100": 312.0, "L40S": 362.1,
}


def peak_tflops(device_name: str) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of a device by name; None when unknown (e.g. a CPU)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key]
    if "h100" in device_name.lower():
        return PEAK_BF16_TFLOPS["H100 SXM"]
    return None


def forward_flops_per_token(shape: ModelShape, seq_length: int, vocab_size: int) -> float:
    h, f, L = shape.hidden_size, shape.ffn_hidden_size, shape.num_layers
    k = shape.num_query_groups * shape.kv_channels
    per_layer = 2 * h * (h + 2 * k) + 4 * seq_length * h + 2 * h * h + 6 * h * f
    return L * per_layer + 2 * h * vocab_size


def train_flops_per_token(shape: ModelShape, seq_length: int, vocab_size: int) -> float:
    return 3.0 * forward_flops_per_token(shape, seq_length, vocab_size)


class Throughput:
    """Turns (tokens, seconds, devices) into tokens/s, TFLOP/s per device and MFU."""

    def __init__(self, shape: ModelShape, seq_length: int, vocab_size: int, world_size: int,
                 device_name: str, peak: Optional[float] = None):
        self.flops_per_token = train_flops_per_token(shape, seq_length, vocab_size)
        self.world_size = world_size
        self.peak = peak if peak is not None else peak_tflops(device_name)

    def __call__(self, tokens: int, seconds: float) -> dict[str, float]:
        tps = tokens / max(seconds, 1e-9)
        tflops = tps * self.flops_per_token / self.world_size / 1e12
        out = {"tokens_per_s": tps, "tflops_per_device": tflops}
        out["mfu"] = tflops / self.peak if self.peak else math.nan
        return out


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.start = now - self.start, now
        return dt
