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

from megatron_srp.data.chat import ASSISTANT, USER
from megatron_srp.evaluation.asr import attack_success
from megatron_srp.evaluation.benchmarks import Behavior
from megatron_srp.inference.results import REFUSAL_CAUSES

METHODS = ("greedy", "topk", "beam", "safebeam", "guarded")
TEMPLATES = {
    # (text before the request, text after it): how a model of each stage is asked
    "plain": ("", ""),           # a base model continues the request as text
    "chat": (USER, ASSISTANT),   # a finetuned model, in the chat format of data/chat.py
    "model": None,               # the model's own chat format (an import's; chat_template.py)
}


def attack_ids(tokenizer, prompt: str, template: str = "plain",
               suffix_ids: Sequence[int] = ()) -> list[int]:
    """The token ids a model is asked with: a document start, the template around the request,
    and an adversarial suffix (GCG's) right after the request when one is given. GCG optimises
    exactly these ids, so the suffix is evaluated as it was found."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    start = [tokenizer.eod]
    if template == "model":
        if getattr(tokenizer, "chat", None) is None:
            raise ValueError("template 'model' needs a model with its own chat format (an "
                             "import of an instruct model); this tokenizer has none: use 'chat'")
        (before, after), start = tokenizer.chat.around_request(), []
    else:
        before, after = TEMPLATES[template]
    if not suffix_ids:
        return start + tokenizer.tokenize(before + prompt + after)
    return (start + tokenizer.tokenize(f"{before}{prompt} ") + list(suffix_ids)
            + tokenizer.tokenize(after))


def decoding_config(method: str, max_new_tokens: int, seed: int, num_beams: int = 10,
                    segment_tokens: int = 256, guard_fail_open: bool = False):
    """The decoding config a method name stands for. ``guard_fail_open``: guarded decoding lets
    an answer through when its reflection is malformed or missing (default: refuse it)."""
    from megatron_srp.inference.beam import BeamConfig, SafeBeamConfig
    from megatron_srp.inference.guarded import GuardConfig
    from megatron_srp.inference.sample import GenerationConfig

    topk = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_k=10, seed=seed)
    builders: dict[str, Callable[[], Any]] = {
        "greedy": lambda: GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0),
        "topk": lambda: topk,
        "beam": lambda: BeamConfig(num_beams=num_beams, max_new_tokens=max_new_tokens),
        "safebeam": lambda: SafeBeamConfig(num_beams=num_beams, max_new_tokens=max_new_tokens),
        "guarded": lambda: GuardConfig(sampling=topk, segment_tokens=segment_tokens,
                                       fail_open=guard_fail_open),
    }
    if method not in builders:
        raise ValueError(f"unknown decoding method {method!r}; choose from {', '.join(METHODS)}")
    return builders[method]()


def _sampled(method: str) -> bool:
    return method in ("topk", "guarded")


def attack_answers(model, tokenizer, behaviors: Sequence[Behavior], methods: Sequence[str],
                   samples: int = 5, max_new_tokens: int = 256, batch_size: int = 16,
                   num_beams: int = 10, segment_tokens: int = 256, template: str = "plain",
                   suffixes: Optional[Sequence[Sequence[int]]] = None,
                   progress: Optional[Callable[[int], None]] = None,
                   guard_fail_open: bool = False) -> dict[str, Any]:
    """Every answer per method, unjudged: ``{method: {"samples_per_prompt", "answers": [{"id",
    "answers": [{"text", "finish", "short_circuited", "category"}]}]}}``. Kept apart from the
    judging so the answers can be saved before a judge (an endpoint that may be down) runs.

    ``suffixes``: an adversarial suffix (token ids) per behaviour, e.g. from GCG."""
    from megatron_srp.inference.generation import decode_ids

    if not behaviors:
        raise ValueError("no behaviours to attack with")
    if suffixes is not None and len(suffixes) != len(behaviors):
        raise ValueError(f"{len(suffixes)} suffixes for {len(behaviors)} behaviours")
    ids = [attack_ids(tokenizer, b.prompt, template, suffixes[i] if suffixes else ())
           for i, b in enumerate(behaviors)]
    out: dict[str, Any] = {}
    for method in methods:
        rounds = samples if _sampled(method) else 1
        answers: list[list[dict]] = [[] for _ in behaviors]
        for seed in range(rounds):
            config = decoding_config(method, max_new_tokens, seed, num_beams, segment_tokens,
                                     guard_fail_open)
            for start in range(0, len(ids), batch_size):
                results = decode_ids(model, tokenizer, ids[start:start + batch_size], config)
                for i, r in enumerate(results, start):
                    answers[i].append({"text": r.text, "finish": r.finish,
                                       "short_circuited": r.short_circuited,
                                       "category": r.category,
                                       "refusal_cause": r.refusal_cause})
                if progress is not None:
                    progress(len(results))
        out[method] = {"samples_per_prompt": rounds,
                       "answers": [{"id": b.id, "answers": a} for b, a in zip(behaviors, answers)]}
    return out


def judge_answers(answers: dict[str, Any], behaviors: Sequence[Behavior], judge
                  ) -> dict[str, Any]:
    """ASR per method (overall and per category) from the answers of :func:`attack_answers`,
    every answer kept with its verdict. The judge sees the request without any suffix."""
    prompts = [b.prompt for b in behaviors]
    categories = [b.category or "none" for b in behaviors]
    out: dict[str, Any] = {}
    for method, got in answers.items():
        rows = got["answers"]
        if [r["id"] for r in rows] != [b.id for b in behaviors]:
            raise ValueError(f"stored {method} answers are for other behaviours than these")
        flat = [(i, a) for i, r in enumerate(rows) for a in r["answers"]]
        verdicts = judge.judge([prompts[i] for i, _ in flat], [a["text"] for _, a in flat])
        harmful: list[list[bool]] = [[] for _ in behaviors]
        judged: list[list[dict]] = [[] for _ in behaviors]
        for (i, a), v in zip(flat, verdicts):
            harmful[i].append(bool(v.harmful) and not a["short_circuited"])
            judged[i].append({**a, "harmful": harmful[i][-1]})
        shorted = sum(a["short_circuited"] for _, a in flat)
        causes = [a.get("refusal_cause") for _, a in flat if a["short_circuited"]]
        out[method] = {**attack_success(harmful, categories),
                       "samples_per_prompt": got["samples_per_prompt"],
                       "short_circuited": shorted,
                       "refusals_by_cause": {c: causes.count(c) for c in REFUSAL_CAUSES
                                             if method == "guarded"},
                       "unparsed_verdicts": sum(bool(v.unparsed) for v in verdicts),
                       "answers": [{"id": b.id, "answers": a} for b, a in zip(behaviors, judged)]}
    return out


def attack_eval(model, tokenizer, behaviors: Sequence[Behavior], methods: Sequence[str], judge,
                samples: int = 5, max_new_tokens: int = 256, batch_size: int = 16,
                num_beams: int = 10, segment_tokens: int = 256, template: str = "plain",
                suffixes: Optional[Sequence[Sequence[int]]] = None,
                progress: Optional[Callable[[int], None]] = None,
                guard_fail_open: bool = False) -> dict[str, Any]:
    """ASR per method (overall and per category) plus every answer, for one model: the
    answers of :func:`attack_answers` judged by :func:`judge_answers`."""
    answers = attack_answers(model, tokenizer, behaviors, methods, samples, max_new_tokens,
                             batch_size, num_beams, segment_tokens, template, suffixes, progress,
                             guard_fail_open)
    return judge_answers(answers, behaviors, judge)
