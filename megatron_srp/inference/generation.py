"""Batched generation with a KV cache, and the one ``decode`` entry point for every method.

Methods are swappable components chosen by the type of their config:

| config | method |
|---|---|
| :class:`~.sample.GenerationConfig` | greedy (temperature 0) or top-k / top-p sampling |
| :class:`~.beam.BeamConfig` | beam search |
| :class:`~.beam.SafeBeamConfig` | SafeBeam (beam search that avoids the harmfulness tag) |
| :class:`~.guarded.GuardConfig` | reflection-guarded decoding (SRP models) |

    results = decode(model, tokenizer, ["How do I"], GenerationConfig(temperature=0))
    results[0].text, results[0].finish

Sampling here draws exactly what the no-cache reference sampler (``sample.generate_ids``)
draws: the same per-prompt random streams, consumed once per new token.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from megatron_srp.inference.kv_cache import KVCache, left_pad
from megatron_srp.inference.results import (  # noqa: F401  (re-exported: decode's results)
    SAFE_COMPLETION, GenerationResult, finish_result, prepare_prompts, tag_id)
from megatron_srp.inference.sample import (GenerationConfig, _decode_continuation, _device_of,
                                           _next_tokens, _row_generator)
from megatron_srp.tokenizer import SRPTokenizer

#: ``observe(row, token, logits)``: sees each token a row keeps; True ends the row there.
Observer = Callable[[int, int, torch.Tensor], bool]


@torch.no_grad()
def sample_ids(model, tokenizer: SRPTokenizer, prompt_ids: Sequence[Sequence[int]],
               gen: GenerationConfig, stop_ids: Sequence[int] = (),
               limits: Optional[Sequence[int]] = None,
               generators: Optional[Sequence[torch.Generator]] = None,
               observe: Optional[Observer] = None) -> list[tuple[list[int], Optional[int]]]:
    """Per prompt ``(new ids, the stop id that ended it or None)`` by greedy decoding or
    sampling with a KV cache. ``stop_ids`` end a row (besides the end-of-document token when
    ``gen.stop_at_eod``) and are not part of its ids. Finished rows leave the batch.

    For a server batching unrelated requests: ``limits`` gives each row its own number of new
    tokens (at most ``gen.max_new_tokens``), ``generators`` each row's random stream (so a
    request samples the same whatever shares its batch), and ``observe(row, token, logits)``
    sees every token a row keeps, with the row's fp32 logits; it returns True to end that row
    there (a stop string, a client gone)."""
    if not prompt_ids:
        return []
    contexts = prepare_prompts(tokenizer, prompt_ids, gen.max_new_tokens,
                               int(model.max_sequence_length))
    dev = _device_of(model)
    stops = set(stop_ids) | (set(tokenizer.stop_ids) if gen.stop_at_eod else set())
    if limits is None:
        limits = [gen.max_new_tokens] * len(contexts)
    elif len(limits) != len(contexts) or any(not 1 <= n <= gen.max_new_tokens for n in limits):
        raise ValueError(f"limits must give each of the {len(contexts)} rows a number of new "
                         f"tokens in [1, {gen.max_new_tokens}]")
    tokens, padding = left_pad(contexts, tokenizer.pad, dev)
    cache = KVCache(model, tokenizer.vocab_size, tokens.size(1) + gen.max_new_tokens)
    if generators is None:
        generators = [_row_generator(gen.seed, i, dev) for i in range(len(contexts))]
    out: list[list[int]] = [[] for _ in contexts]
    stopped: list[Optional[int]] = [None] * len(contexts)
    rows = list(range(len(contexts)))  # prompt index of each cache row
    was_training = model.training
    model.eval()
    try:
        logits = cache.prefill(tokens, padding) if gen.max_new_tokens else None
        for step in range(gen.max_new_tokens):
            active = torch.ones(len(rows), dtype=torch.bool, device=dev)
            nxt = _next_tokens(logits, gen, [generators[r] for r in rows], active).tolist()
            keep = []
            for j, (r, tok) in enumerate(zip(rows, nxt)):
                if tok in stops:
                    stopped[r] = tok
                    continue
                out[r].append(tok)
                ended = observe is not None and observe(r, tok, logits[j])
                if not ended and len(out[r]) < limits[r]:
                    keep.append(j)
            if step == gen.max_new_tokens - 1 or not keep:
                break
            if len(keep) < len(rows):
                cache.select(keep)
                rows = [rows[j] for j in keep]
            step_tokens = torch.tensor([[nxt[j]] for j in keep], dtype=torch.long, device=dev)
            logits = cache.extend(step_tokens)
    finally:
        model.train(was_training)
    return list(zip(out, stopped))


def _sample(model, tokenizer: SRPTokenizer, prompt_ids: list[list[int]],
            gen: GenerationConfig) -> list[GenerationResult]:
    tag = tag_id(tokenizer)
    results = []
    for prompt, (ids, stop) in zip(prompt_ids, sample_ids(model, tokenizer, prompt_ids, gen,
                                                          stop_ids=[tag])):
        results.append(finish_result(tokenizer, prompt, ids, stop, tag))
    return results


def _registry() -> dict[type, Callable]:
    from megatron_srp.inference.beam import BeamConfig, SafeBeamConfig, beam_search
    from megatron_srp.inference.guarded import GuardConfig, guarded_decode
    return {GenerationConfig: _sample, BeamConfig: beam_search, SafeBeamConfig: beam_search,
            GuardConfig: guarded_decode}


def decode(model, tokenizer: SRPTokenizer, prompts: Sequence[str], config) -> list[GenerationResult]:
    """Answer each prompt with the method ``config`` selects (see the table above)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompt_ids = tokenizer.tokenize_batch(list(prompts)) if prompts else []
    return decode_ids(model, tokenizer, prompt_ids, config)


def decode_ids(model, tokenizer: SRPTokenizer, prompt_ids: list[list[int]],
               config) -> list[GenerationResult]:
    """:func:`decode` for prompts that are already token ids."""
    method = _registry().get(type(config))
    if method is None:
        raise TypeError(f"no decoding method for {type(config).__name__}")
    return method(model, tokenizer, prompt_ids, config)
