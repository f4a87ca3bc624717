"""Attack success rate of a model on a benchmark, per decoding method.

    results = attack_eval(model, tokenizer, load_benchmark("advbench-completion"),
                          methods=["topk", "safebeam", "guarded"], judge=RefusalKeywordJudge())

Sampling methods answer each prompt ``samples`` times (seeds 0..samples-1; the papers use top-k
10, 256 new tokens, 5 samples); deterministic ones once. An answer the decoder short-circuited
(the harmfulness tag, or an Unsafe reflection) is a refusal whatever the judge says of its
fixed text.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from megatron_srp.evaluation.asr import attack_success
from megatron_srp.evaluation.benchmarks import Behavior

METHODS = ("greedy", "topk", "beam", "safebeam", "guarded")


def decoding_config(method: str, max_new_tokens: int, seed: int, num_beams: int = 10,
                    segment_tokens: int = 256):
    """The decoding config a method name stands for."""
    from megatron_srp.inference.beam import BeamConfig, SafeBeamConfig
    from megatron_srp.inference.guarded import GuardConfig
    from megatron_srp.inference.sample import GenerationConfig

    topk = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_k=10, seed=seed)
    builders: dict[str, Callable[[], Any]] = {
        "greedy": lambda: GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0),
        "topk": lambda: topk,
        "beam": lambda: BeamConfig(num_beams=num_beams, max_new_tokens=max_new_tokens),
        "safebeam": lambda: SafeBeamConfig(num_beams=num_beams, max_new_tokens=max_new_tokens),
        "guarded": lambda: GuardConfig(sampling=topk, segment_tokens=segment_tokens),
    }
    if method not in builders:
        raise ValueError(f"unknown decoding method {method!r}; choose from {', '.join(METHODS)}")
    return builders[method]()


def _sampled(method: str) -> bool:
    return method in ("topk", "guarded")


def attack_eval(model, tokenizer, behaviors: Sequence[Behavior], methods: Sequence[str], judge,
                samples: int = 5, max_new_tokens: int = 256, batch_size: int = 16,
                num_beams: int = 10, segment_tokens: int = 256,
                progress: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """ASR per method (overall and per category) plus every answer, for one model."""
    from megatron_srp.inference.generation import decode

    if not behaviors:
        raise ValueError("no behaviours to attack with")
    prompts = [b.prompt for b in behaviors]
    categories = [b.category or "none" for b in behaviors]
    out: dict[str, Any] = {}
    for method in methods:
        rounds = samples if _sampled(method) else 1
        harmful: list[list[bool]] = [[] for _ in behaviors]
        answers: list[list[dict]] = [[] for _ in behaviors]
        for seed in range(rounds):
            config = decoding_config(method, max_new_tokens, seed, num_beams, segment_tokens)
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                results = decode(model, tokenizer, chunk, config)
                verdicts = judge.judge(chunk, [r.text for r in results])
                for i, (r, v) in enumerate(zip(results, verdicts), start):
                    harmful[i].append(v.harmful and not r.short_circuited)
                    answers[i].append({"text": r.text, "finish": r.finish,
                                       "short_circuited": r.short_circuited,
                                       "category": r.category, "harmful": harmful[i][-1]})
                if progress is not None:
                    progress(len(chunk))
        shorted = sum(a["short_circuited"] for row in answers for a in row)
        out[method] = {**attack_success(harmful, categories), "samples_per_prompt": rounds,
                       "short_circuited": shorted,
                       "answers": [{"id": b.id, "answers": a} for b, a in zip(behaviors, answers)]}
    return out
