"""Continuous batching for sampling requests: rows join a running batch and leave it as soon as
they are done, so a short answer is returned at once and a new request need not wait for the
longest answer of the batch before it.

Megatron's static KV cache advances every row one position per step, all at the same offset.
A request joins at that offset: its prompt is prefilled in a cache of its own, left-padded to
the batch's length (rotary positions only see differences of positions, and the padding is
masked), and the two caches are merged. A prompt longer than the batch's length, or an answer
that would not fit the context from there, waits until the batch has drained.

Each row samples from its own random stream and the same logits as it would alone, so a greedy
or seeded answer does not depend on which other requests shared its batch.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional

import torch

from megatron_srp.inference.kv_cache import KVCache, left_pad
from megatron_srp.inference.results import GenerationResult, finish_result
from megatron_srp.inference.sample import (GenerationConfig, _device_of, _next_tokens,
                                          _row_generator)


@dataclass
class Job:
    """One choice of one request: its prompt ids, how to decode it, and where the answer goes.

    ``method`` is a decoding config (``GenerationConfig``, ``SafeBeamConfig``, ``GuardConfig``);
    for sampling, ``max_new_tokens`` is this job's own limit. ``on_token(token, logits)`` (if
    set) sees every new token as it is drawn (streaming, logprobs, stop strings) and returns
    True to end the answer there. The future receives a :class:`GenerationResult`."""

    prompt_ids: list[int]
    method: Any
    seed: int = 0
    choice: int = 0
    on_token: Optional[Callable[[int, torch.Tensor], bool]] = None
    future: Future = field(default_factory=Future)
    stopped_by_observer: bool = False
    started: float = 0.0  # when decoding began (time.monotonic)

    def batch_key(self) -> tuple:
        """Jobs with equal keys may share a batch."""
        m = self.method
        if isinstance(m, GenerationConfig):
            return ("sample", m.temperature, m.top_k, m.top_p, m.stop_at_eod)
        return (type(m).__name__, repr(asdict(m)))

    @property
    def max_new_tokens(self) -> int:
        return int(self.method.max_new_tokens)


@dataclass
class _Row:
    job: Job
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)


class RunningBatch:
    """The sampling rows being decoded together, on one KV cache sized to the context."""

    def __init__(self, model, tokenizer, window: int, tag: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.window = window
        self.tag = tag
        self.device = _device_of(model)
        self.cache: Optional[KVCache] = None
        self.rows: list[_Row] = []
        self.logits: Optional[torch.Tensor] = None  # [rows, vocab]: next-token logits
        self.key: Optional[tuple] = None

    def __len__(self) -> int:
        return len(self.rows)

    def fits(self, job: Job, start: list[Job]) -> bool:
        """Whether ``job`` can join now (``start``: the jobs a new batch is being formed of)."""
        if self.cache is None:
            group = start + [job]
            return (job.batch_key() == (start[0].batch_key() if start else job.batch_key())
                    and max(len(j.prompt_ids) for j in group)
                    + max(j.max_new_tokens for j in group) <= self.window)
        length = self.cache.length
        return (job.batch_key() == self.key and len(job.prompt_ids) <= length
                and length + job.max_new_tokens <= self.cache.max_length)

    @torch.no_grad()
    def admit(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` and add them: a new batch, or rows joining the running one."""
        if not jobs:
            return
        prompts = [j.prompt_ids for j in jobs]
        if self.cache is None:
            tokens, padding = left_pad(prompts, self.tokenizer.pad, self.device)
            self.cache = KVCache(self.model, self.tokenizer.vocab_size, self.window)
            self.logits = self.cache.prefill(tokens, padding)
            self.key = jobs[0].batch_key()
        else:
            tokens, padding = left_pad(prompts, self.tokenizer.pad, self.device,
                                       width=self.cache.length)
            side = KVCache(self.model, self.tokenizer.vocab_size, self.cache.max_length)
            logits = side.prefill(tokens, padding)
            self.cache.merge(side)
            self.logits = torch.cat([self.logits, logits], dim=0)
        self.rows += [_Row(j, _row_generator(j.seed, j.choice, self.device)) for j in jobs]

    @torch.no_grad()
    def step(self) -> list[tuple[Job, GenerationResult]]:
        """Draw one token for every row; returns the rows that finished, with their results."""
        assert self.cache is not None and self.logits is not None
        gen = replace(self.rows[0].job.method, max_new_tokens=1)
        active = torch.ones(len(self.rows), dtype=torch.bool, device=self.device)
        drawn = _next_tokens(self.logits, gen, [r.generator for r in self.rows], active).tolist()
        stops = {self.tag} | ({self.tokenizer.eod} if gen.stop_at_eod else set())
        done: list[tuple[Job, GenerationResult]] = []
        keep: list[int] = []
        for i, (row, tok) in enumerate(zip(self.rows, drawn)):
            job = row.job
            stop: Optional[int] = tok if tok in stops else None
            if stop is None:
                row.ids.append(tok)
                observed = job.on_token is not None and job.on_token(tok, self.logits[i])
                job.stopped_by_observer = bool(observed)
                if not observed and len(row.ids) < job.max_new_tokens:
                    keep.append(i)
                    continue
            done.append((job, finish_result(self.tokenizer, job.prompt_ids, row.ids, stop,
                                            self.tag)))
        if not keep:
            self.reset()
            return done
        if len(keep) < len(self.rows):
            self.cache.select(keep)
            self.rows = [self.rows[i] for i in keep]
        feed = torch.tensor([[drawn[i]] for i in keep], dtype=torch.long, device=self.device)
        self.logits = self.cache.extend(feed)
        return done

    def reset(self) -> None:
        self.cache, self.rows, self.logits, self.key = None, [], None, None
