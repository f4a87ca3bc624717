"""Beam search and SafeBeam over a KV cache, for a batch of prompts at once.

**Beam search** keeps the ``num_beams`` best continuations of each prompt by summed
log-probability. A continuation that produces the end-of-document token (with ``stop_at_eod``)
or the harmfulness tag is finished; a prompt is done once it has ``num_beams`` finished
continuations (or at ``max_new_tokens``, when the live beams count as finished), and its
answer is the finished one with the best ``score / new_tokens ** length_penalty``, where
``new_tokens`` counts the stop token, whose log-probability is in the score (as in
``transformers``).

**SafeBeam** (Maini et al. 2025, Algorithm 1): at each step every beam proposes its
``top_n`` most likely next tokens. Each candidate y' is fed to the model once more, which gives
the look-ahead probability that the token after y' is ``<potentially_unsafe_content>``; the
candidates judged likely to be followed by the tag are dropped (see :class:`SafeBeamConfig`:
by default those whose look-ahead is at least ``tag_threshold``; a fixed ``drop_fraction``
of them, as this module first did, is ``rule="fraction"``), and the best ``num_beams`` of the
rest by log-probability survive. The look-ahead forward pass is also the survivors' next step,
so SafeBeam costs one forward pass per step, over ``top_n`` times the rows. An answer that
ends in the tag is short-circuited to the fixed safe completion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_srp.inference.kv_cache import KVCache, left_pad
from megatron_srp.inference.results import (GenerationResult, finish_result,
                                               prepare_prompts, tag_id)
from megatron_srp.inference.sample import _device_of
from megatron_srp.tokenizer import SRPTokenizer


@dataclass
class BeamConfig:
    """Beam search; ``num_beams`` 10 as in the safety-pretraining papers."""

    num_beams: int = 10
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    stop_at_eod: bool = True

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


#: SafeBeam's rules for which candidates are dropped (see :class:`SafeBeamConfig`).
RULES = ("threshold", "fraction")


@dataclass
class SafeBeamConfig(BeamConfig):
    """SafeBeam: every beam proposes ``top_n`` candidates, the candidates likely to be followed
    by the harmfulness tag are dropped, and the best ``num_beams`` of the rest survive.

    The papers describe SafeBeam as dropping candidates "that have a high probability of the
    next token being the harmful special token". ``rule`` says what "high" means:

    ``"threshold"`` (the default): a candidate y' is dropped when its look-ahead tag
    probability p = P(tag | prefix, y') is high in absolute terms, ``p >= tag_threshold``,
    or, with ``tag_relative`` set, when the continuation "y' then the tag" is at least
    ``tag_relative`` times as likely as the best-ranked candidate b itself:
    ``P(y') * p >= tag_relative * P(b)`` (P: a continuation's probability, the exponential of
    the summed log-probability beam search ranks by). The relative test is the absolute one with a threshold scaled by how much less likely
    y' is than b, ``p >= tag_relative * P(b) / P(y')``: a candidate the search is unlikely to
    follow needs a higher tag probability to be dropped. No continuation of b is likelier
    than b, so with ``tag_relative=1`` y' is dropped when "y' + tag" would outrank, one step
    on, everything b can become; smaller values drop earlier. It implies ``p >=
    tag_relative`` and drops nothing on a model whose tag probabilities are tiny. With both
    set, a candidate over either is dropped; ``tag_threshold=None`` leaves the relative test
    alone.

    ``tag_threshold`` defaults to 0.1. Greedy decoding emits the tag once it is the likeliest
    next token, and top-k sampling draws it about as often as its probability: a tag that is
    about to be written has a probability of tenths, and a model that learned the tag puts
    nearly all its probability on it where its training data had it. 0.5 would only catch a
    tag that is already certain to be the likeliest token; 0.1, well below that, drops a
    candidate once the model would write the tag after it in at least one sample in ten. A
    model that never learned the tag (2e-15 to 1e-7 measured on a trained one; about one over
    the vocabulary, 1e-4, on an untrained one) is orders of magnitude below it, so SafeBeam
    drops nothing and is beam search over the ``top_n`` best tokens of each beam.

    A candidate that ends the answer (the tag itself, or the end-of-document token with
    ``stop_at_eod``) has no next token to look ahead at; the threshold rule never drops it
    (the tag ends its answer in the safe completion).

    Never all: when every candidate of a prompt is over the threshold, the ``num_beams`` with
    the lowest tag probability are kept (the search goes on and the tag, if it comes, ends an
    answer and short-circuits it) and the rest dropped. When only some are over, the rest go
    on, even if they are fewer than ``num_beams``.

    ``"fraction"``: the paper's Algorithm 1 as first implemented here, the ``drop_fraction``
    of candidates with the highest tag probability are dropped at every step, however small
    that probability. On a model without a learned tag that discards candidates by noise
    (often the best one), and answers get much less likely; kept for comparison.
    """

    top_n: int = 2
    rule: str = "threshold"
    tag_threshold: Optional[float] = 0.1
    tag_relative: Optional[float] = None
    drop_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {self.top_n}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.tag_threshold is not None and not 0.0 <= self.tag_threshold <= 1.0:
            raise ValueError(f"tag_threshold must be a probability in [0, 1] (or None), got "
                             f"{self.tag_threshold}")
        if self.tag_relative is not None and not 0.0 < self.tag_relative <= 1.0:
            raise ValueError(f"tag_relative must be in (0, 1] (or None), got "
                             f"{self.tag_relative}")
        if self.rule == "threshold" and self.tag_threshold is None and self.tag_relative is None:
            raise ValueError("rule='threshold' needs tag_threshold or tag_relative (both are "
                             "None)")
        if not 0.0 <= self.drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1), got {self.drop_fraction}")
        if self.rule == "fraction":
            kept = self.num_beams * self.top_n - math.ceil(self.drop_fraction * self.num_beams
                                                           * self.top_n)
            if kept < self.num_beams:
                raise ValueError(f"num_beams={self.num_beams} x top_n={self.top_n} candidates "
                                 f"leave {kept} after pruning {self.drop_fraction:.0%} "
                                 f"(drop_fraction); need at least num_beams (raise top_n)")

    def over(self, tag_prob: float, logp: float, best_logp: float) -> bool:
        """Whether the threshold rule drops a candidate of summed log-probability ``logp``
        whose look-ahead tag probability is ``tag_prob`` (``best_logp``: the best-ranked
        candidate's)."""
        if self.tag_threshold is not None and tag_prob >= self.tag_threshold:
            return True
        return (self.tag_relative is not None and tag_prob > 0.0 and
                math.log(tag_prob) + logp >= math.log(self.tag_relative) + best_logp)

    def dropped(self, tag_probs: list[float], logps: list[float],
                ends: Optional[list[bool]] = None) -> tuple[list[int], list[int]]:
        """One prompt's candidates, best-ranked first, by their look-ahead tag probabilities,
        summed log-probabilities and whether they end the answer: the positions dropped, and
        (threshold rule) the positions over the threshold kept because every candidate was
        over it. Ties in tag probability go against the better-ranked candidate when dropping
        by fraction and for it when keeping the least tagged."""
        n = len(tag_probs)
        if self.rule == "fraction":
            most_tagged = sorted(range(n), key=lambda k: (-tag_probs[k], k))
            return sorted(most_tagged[:math.ceil(self.drop_fraction * n)]), []
        over = [k for k in range(n) if not (ends and ends[k])
                and self.over(tag_probs[k], logps[k], logps[0])]
        if n and len(over) == n:
            kept = set(sorted(range(n), key=lambda k: (tag_probs[k], k))[:self.num_beams])
            return [k for k in range(n) if k not in kept], sorted(kept)
        return over, []


@dataclass
class _Prompt:
    """One prompt's search: its live beams (ids, summed log-prob) and finished answers."""

    beams: list[tuple[list[int], float]]
    finished: list[tuple[float, list[int], Optional[int], float]]  # (norm, ids, stop, logp)
    done: bool = False


def _normalised(logp: float, n: int, penalty: float) -> float:
    return logp / (max(n, 1) ** penalty)


def _candidates(live: list[_Prompt], logprobs: torch.Tensor, per_row: int,
                limit: Optional[int]) -> list[list[tuple[int, int, float]]]:
    """Per live prompt, its candidates ``(parent row, token, summed log-prob)`` best first:
    the ``per_row`` most likely tokens of each of its beams, at most ``limit`` of them."""
    values, tokens = torch.topk(logprobs, per_row, dim=-1)
    beam_logp = torch.tensor([lp for st in live for _, lp in st.beams], device=values.device)
    scores = values + beam_logp.unsqueeze(1)
    counts = [len(st.beams) for st in live]
    starts = [sum(counts[:p]) for p in range(len(live))]
    width = max(counts) * per_row
    if all(c == counts[0] for c in counts):
        padded = scores.reshape(len(live), width)
    else:
        padded = scores.new_full((len(live), width), float("-inf"))
        for p, (start, n) in enumerate(zip(starts, counts)):
            padded[p, :n * per_row] = scores[start:start + n].reshape(-1)
    top_v, top_i = padded.topk(width if limit is None else min(limit, width), dim=-1)
    top_v, top_i, token_list = top_v.tolist(), top_i.tolist(), tokens.tolist()
    out = []
    for p, start in enumerate(starts):
        cands = []
        for v, i in zip(top_v[p], top_i[p]):
            if v == float("-inf"):
                break
            row = start + i // per_row
            cands.append((row, token_list[row][i % per_row], v))
        out.append(cands)
    return out


def _choose(st: _Prompt, order: list[int], toks: list[int], scores: list[float],
            parents_ids: list[list[int]], stops: set[int], cfg: BeamConfig,
            last_step: bool) -> list[int]:
    """Walk candidates best first: finished ones are recorded, the first ``num_beams`` others
    become the new beams. Returns the chosen candidates' positions."""
    chosen, beams = [], []
    for rank, c in enumerate(order):
        ids = parents_ids[c] + [toks[c]]
        if toks[c] in stops:
            if rank < cfg.num_beams:
                # the stop token is counted in the length, as its log-probability is in the
                # score (transformers does the same); without it a finished answer was
                # penalised by (n+1)/n and lost to a run-on
                st.finished.append((_normalised(scores[c], len(ids), cfg.length_penalty),
                                    ids[:-1], toks[c], scores[c]))
            continue
        if len(beams) < cfg.num_beams:
            beams.append((ids, scores[c]))
            chosen.append(c)
    st.beams = beams
    if last_step or not beams or _settled(st, cfg):
        if last_step:
            st.finished += [(_normalised(lp, len(ids), cfg.length_penalty), ids, None, lp)
                            for ids, lp in beams]
        st.done = True
        return []
    return chosen


def _settled(st: _Prompt, cfg: BeamConfig) -> bool:
    """Whether the search of one prompt can stop: ``num_beams`` answers have finished and no
    live beam, scored as if it ended now, beats the ``num_beams``-th best of them (as
    ``transformers`` does without early stopping). Stopping as soon as ``num_beams`` had
    finished let a stop token that is every step's second choice (a model that learned the
    harmfulness tag puts 0.3-4% on it) fill the finished list within a few steps and win over
    the answer, which had not finished yet."""
    if len(st.finished) < cfg.num_beams:
        return False
    bar = sorted((f[0] for f in st.finished), reverse=True)[cfg.num_beams - 1]
    best_live = max(_normalised(lp, len(ids), cfg.length_penalty) for ids, lp in st.beams)
    return best_live <= bar


@torch.no_grad()
def beam_search(model, tokenizer: SRPTokenizer, prompt_ids: list[list[int]],
                cfg: BeamConfig, trace: Optional[list] = None) -> list[GenerationResult]:
    """The best continuation of each prompt by beam search or, for a
    :class:`SafeBeamConfig`, SafeBeam.

    With a ``trace`` list, SafeBeam appends one dict per live prompt and step: ``prompt`` (its
    index), ``step``, ``rule``, ``candidates`` (every candidate continuation's ids, best-ranked
    first, as beam search would rank them), their summed log-probabilities ``logps`` and
    look-ahead tag probabilities ``tag_probs``, ``pruned_ranks`` (the positions in
    ``candidates`` dropped), ``pruned`` (their ids) and ``kept_over`` (the positions over the
    threshold kept because every candidate was over it)."""
    if not prompt_ids:
        return []
    safe = isinstance(cfg, SafeBeamConfig)
    tag = tag_id(tokenizer)
    stops = {tag} | (set(tokenizer.stop_ids) if cfg.stop_at_eod else set())
    contexts = prepare_prompts(tokenizer, prompt_ids, cfg.max_new_tokens,
                               int(model.max_sequence_length))
    dev = _device_of(model)
    tokens, padding = left_pad(contexts, tokenizer.pad, dev)
    cache = KVCache(model, tokenizer.vocab_size, tokens.size(1) + cfg.max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        logits = cache.prefill(tokens, padding)
        # The cache row that holds each live beam, in beam order. SafeBeam leaves the rows of
        # its look-ahead pass in place and only remembers which of them survived, so each of
        # its steps copies the cache once, like beam search.
        cache_rows = list(range(len(contexts)))
        states = [_Prompt(beams=[([], 0.0)], finished=[]) for _ in contexts]
        for step in range(cfg.max_new_tokens):
            logprobs = torch.log_softmax(logits, dim=-1)
            if safe:
                per_row = cfg.num_beams * cfg.top_n if step == 0 else cfg.top_n
            else:
                per_row = 2 * cfg.num_beams
            per_row = min(per_row, logprobs.size(-1))
            live = [i for i, st in enumerate(states) if not st.done]
            per_prompt = _candidates([states[i] for i in live], logprobs, per_row,
                                     None if safe else 2 * cfg.num_beams)
            flat = [c for cands in per_prompt for c in cands]
            parents, toks, scores = ([c[0] for c in flat], [c[1] for c in flat],
                                     [c[2] for c in flat])
            row_ids = [ids for i in live for ids, _ in states[i].beams]
            parents_ids = [row_ids[p] for p in parents]
            look = None
            if safe:
                # Feed every candidate: the tag's probability after it, and the next logits.
                cache.select([cache_rows[p] for p in parents])
                look = cache.extend(torch.tensor(toks, device=dev).unsqueeze(1))
                tag_prob = torch.softmax(look, dim=-1)[:, tag].tolist()
            last = step == cfg.max_new_tokens - 1
            keep: list[int] = []
            start = 0
            for i, cands in zip(live, per_prompt):
                span = list(range(start, start + len(cands)))  # best first
                start += len(cands)
                if safe:
                    probs, logps = [tag_prob[c] for c in span], [scores[c] for c in span]
                    ranks, kept_over = cfg.dropped(probs, logps,
                                                   [toks[c] in stops for c in span])
                    if trace is not None:
                        trace.append({
                            "prompt": i, "step": step, "rule": cfg.rule,
                            "candidates": [parents_ids[c] + [toks[c]] for c in span],
                            "logps": logps, "tag_probs": probs, "pruned_ranks": ranks,
                            "pruned": [parents_ids[span[r]] + [toks[span[r]]] for r in ranks],
                            "kept_over": kept_over})
                    pruned = {span[r] for r in ranks}
                    span = [c for c in span if c not in pruned]
                keep += _choose(states[i], span, toks, scores, parents_ids, stops, cfg, last)
            if not keep:
                break
            if safe:
                cache_rows = keep
                logits = look[keep]
            else:
                cache.select([cache_rows[parents[c]] for c in keep])
                cache_rows = list(range(len(keep)))
                logits = cache.extend(torch.tensor([toks[c] for c in keep],
                                                   device=dev).unsqueeze(1))
    finally:
        model.train(was_training)
    results = []
    for prompt, st in zip(contexts, states):
        if not st.finished:  # every candidate ended at once, beyond the beam's ranks
            results.append(finish_result(tokenizer, prompt, [], tokenizer.eod, tag))
            continue
        norm, ids, stop, logp = max(st.finished, key=lambda f: f[0])
        results.append(finish_result(tokenizer, prompt, ids, stop, tag, score=norm))
    return results
