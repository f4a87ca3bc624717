"""Generation throughput: this project's decoding methods against Hugging Face ``generate``.

The same weights run both ways: the Megatron model (a checkpoint, or a fresh one of a preset)
and the ``LlamaForCausalLM`` it exports to (:func:`~.hf_export.to_hf_llama`), on the same device,
in the same process, one after the other. Every measurement generates exactly
``max_new_tokens`` tokens per answer (the end-of-document token does not stop either side), so
tokens/s compare like with like. Methods:

| method | ours | Hugging Face |
|---|---|---|
| greedy | ``sample_ids``, temperature 0 | ``do_sample=False`` |
| sample | top-k 10 | ``do_sample=True, top_k=10`` |
| beam | ``beam_search`` | ``num_beams`` (``early_stopping=True``) |
| safebeam | SafeBeam, ``top_n`` 2 | (none; compared with our beam search) |

Each case is warmed up once, then timed ``repeats`` times with ours and Hugging Face's runs
interleaved; the figures are medians.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megatron_srp import compat

METHODS = ("greedy", "sample", "beam", "safebeam")


@dataclass
class BenchCase:
    method: str
    batch: int
    impl: str  # "megatron-srp" or "hf"


def prompts_from(path: Path, tokenizer, n: int, prompt_tokens: int) -> list[list[int]]:
    """``n`` prompts of ``prompt_tokens`` tokens cut from a real text file."""
    ids = tokenizer.tokenize(path.read_text(encoding="utf-8")[:400_000])
    if len(ids) < n * prompt_tokens:
        raise ValueError(f"{path} has {len(ids)} tokens, need {n * prompt_tokens}")
    step = len(ids) // n
    return [ids[i * step:i * step + prompt_tokens] for i in range(n)]


def _ours(model, tokenizer, method: str, prompts, max_new: int, beams: int) -> Callable[[], int]:
    from megatron_srp.inference.beam import BeamConfig, SafeBeamConfig, beam_search
    from megatron_srp.inference.generation import sample_ids
    from megatron_srp.inference.sample import GenerationConfig

    if method in ("greedy", "sample"):
        gen = GenerationConfig(max_new_tokens=max_new, temperature=0.0 if method == "greedy"
                               else 1.0, top_k=10, stop_at_eod=False)
        return lambda: sum(len(ids) for ids, _ in sample_ids(model, tokenizer, prompts, gen))
    cls = SafeBeamConfig if method == "safebeam" else BeamConfig
    cfg = cls(num_beams=beams, max_new_tokens=max_new, stop_at_eod=False)
    return lambda: sum(len(r.ids) for r in beam_search(model, tokenizer, prompts, cfg))


def _hf(hf, tokenizer, method: str, prompts, max_new: int, beams: int) -> Callable[[], int]:
    dev = next(hf.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new, min_new_tokens=max_new,
                                  pad_token_id=tokenizer.pad, eos_token_id=tokenizer.eod)
    if method == "greedy":
        kwargs.update(do_sample=False)
    elif method == "sample":
        kwargs.update(do_sample=True, top_k=10, top_p=1.0, temperature=1.0)
    else:
        kwargs.update(do_sample=False, num_beams=beams, early_stopping=True)

    def run() -> int:
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return int((out.size(1) - width) * out.size(0))
    return run


def _timed(run: Callable[[], int]) -> tuple[int, float]:
    compat.synchronize()
    start = time.perf_counter()
    tokens = run()
    compat.synchronize()
    return tokens, time.perf_counter() - start


def time_cases(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, dict[str, Any]]:
    """Each implementation warmed up once, then timed ``repeats`` times, the implementations
    interleaved (alternating which goes first) so that drift of the machine hits all alike.
    Median tokens/s per implementation."""
    for run in runs.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, int] = {}
    names = list(runs)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            tokens[name], elapsed = _timed(runs[name])
            rates[name].append(tokens[name] / elapsed)
            seconds[name].append(elapsed)
    return {name: {"tokens_per_s": statistics.median(rates[name]),
                   "seconds": statistics.median(seconds[name]), "tokens": tokens[name],
                   "runs": [round(x, 1) for x in rates[name]]} for name in runs}


def run_bench(model, hf, tokenizer, prompts: list[list[int]], batches: list[int],
              methods: list[str], max_new: int, beams: int, repeats: int,
              log: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """Every (method, batch, implementation) case; rows of a report."""
    rows = []
    for method in methods:
        for batch in batches:
            runs = {"megatron-srp": _ours(model, tokenizer, method, prompts[:batch], max_new,
                                          beams)}
            if method != "safebeam":
                runs["hf"] = _hf(hf, tokenizer, method, prompts[:batch], max_new, beams)
            for impl, result in time_cases(runs, repeats).items():
                rows.append({"method": method, "batch": batch, "impl": impl, **result})
                if log:
                    log(f"  {method:8s} batch {batch:3d} {impl:12s} "
                        f"{result['tokens_per_s']:9.1f} tokens/s")
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ours over Hugging Face per (method, batch), and SafeBeam's time over beam search's."""
    by = {(r["method"], r["batch"], r["impl"]): r for r in rows}
    out: dict[str, Any] = {"vs_hf": {}, "safebeam_over_beam_time": {}}
    for (method, batch, impl), r in by.items():
        hf = by.get((method, batch, "hf"))
        if impl == "megatron-srp" and hf:
            out["vs_hf"][f"{method}@{batch}"] = round(r["tokens_per_s"] / hf["tokens_per_s"], 3)
        beam = by.get(("beam", batch, "megatron-srp"))
        if method == "safebeam" and beam:
            out["safebeam_over_beam_time"][f"@{batch}"] = round(
                beam["tokens_per_s"] / r["tokens_per_s"], 3)
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# Generation benchmark", "",
             f"{m['device']}; {m['python']}, torch {m['torch']}; model {report['model']}; "
             f"commit {m['commit']}; {m['date']}.", "",
             f"Prompts of {report['prompt_tokens']} tokens, {report['max_new_tokens']} new "
             f"tokens each, {report['num_beams']} beams, median of {report['repeats']} runs.", "",
             "| method | batch | megatron-srp tokens/s | Hugging Face tokens/s | ours / HF |",
             "|---|---|---|---|---|"]
    by = {(r["method"], r["batch"], r["impl"]): r for r in report["rows"]}
    for method in METHODS:
        for batch in report["batches"]:
            ours = by.get((method, batch, "megatron-srp"))
            if ours is None:
                continue
            hf = by.get((method, batch, "hf"))
            ratio = f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
            hf_rate = f"{hf['tokens_per_s']:.1f}" if hf else "-"
            lines.append(f"| {method} | {batch} | {ours['tokens_per_s']:.1f} | {hf_rate} | "
                         f"{ratio} |")
    r = report["ratios"]
    lines += ["", "SafeBeam time over beam search time: " + ", ".join(
        f"batch {k[1:]}: {v:.2f}x" for k, v in r["safebeam_over_beam_time"].items()), ""]
    return "\n".join(lines)


def build_models(checkpoint: Optional[str], preset: str, seq_length: int):
    """``(megatron model, hf model, tokenizer, description)``: a checkpoint's model, or a fresh
    model of ``preset`` with the shipped tokenizer (throughput does not depend on training)."""
    from megatron_srp.config import ExperimentConfig, to_dict
    from megatron_srp.inference.hf_export import to_hf_llama
    from megatron_srp.inference.sample import fresh_model, inference_config, load_for_inference
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

    if checkpoint:
        model, tokenizer, cfg = load_for_inference(checkpoint)
        described = f"{checkpoint} ({cfg.model.preset})"
    else:
        base = ExperimentConfig()
        base.model.preset = preset
        base.train.seq_length = seq_length
        cfg = inference_config(to_dict(base))
        tokenizer = SRPTokenizer.from_dir(default_tokenizer_dir())
        model = fresh_model(cfg, tokenizer.vocab_size)
        described = f"fresh {preset}, sequence length {seq_length}"
    dtype = "bfloat16" if cfg.train.precision == "bf16" else "float32"
    hf = to_hf_llama(model, cfg, tokenizer, dtype)
    params = sum(p.numel() for p in hf.parameters())
    return model, hf, tokenizer, f"{described}, {params / 1e6:.1f}M parameters, {dtype}"


def machine(commit_dir: Path) -> dict[str, Any]:
    from megatron_srp.bench.preprocess import machine_info

    info = machine_info(None)
    return {"device": compat.device_name(), "python": f"Python {info['python']}",
            "torch": info["torch"], "transformers": info["transformers"],
            "megatron_core": info["megatron-core"],
            "commit": (info["git_commit"] or "unknown")[:7] + (" (dirty)" if info["git_dirty"]
                                                               else ""),
            "date": info["date_utc"], "cpu": info["cpu_model"], "cpu_count": info["cpu_count"]}
