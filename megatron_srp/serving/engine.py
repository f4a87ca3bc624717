"""The batching engine behind the server: one thread owns the model, requests wait in a bounded
queue, and whatever is waiting when the model comes free is decoded together in one batch.

This is *dynamic* batching: a batch runs to its end before the next one starts (Megatron's
static KV cache advances every row by one position per step, so rows cannot join a running
batch). Rows that finish early leave the batch, so a long answer does not slow the short ones
down, but a request that arrives mid-batch waits for it. With ``max_queue`` requests waiting,
:meth:`Engine.submit` raises :class:`QueueFull` at once: the server answers 429 with
``Retry-After`` instead of letting clients hang.

Sampling requests (greedy, top-k, top-p) that share ``temperature``, ``top_k`` and ``top_p``
share a batch whatever their lengths, seeds and ``max_tokens``: each row has its own random
stream (seeded by the request's ``seed`` and the choice index), so a seeded request gets the
same answer alone or in a batch. SafeBeam and reflection-guarded requests batch with requests of
the same settings. Prompt scoring (``echo`` with ``logprobs``: :class:`~.logprobs.PromptScore`)
is one forward pass over the prompts, batched with other scoring jobs.

A job records when it was queued, started and drew its first token (the metrics read them);
:meth:`Engine.withdraw` takes a request's jobs back while none of them has started (the server's
queue-wait limit).
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional

import torch

from megatron_srp.inference.generation import decode_ids, sample_ids
from megatron_srp.inference.results import GenerationResult, finish_result, tag_id
from megatron_srp.inference.sample import GenerationConfig, _device_of, _row_generator
from megatron_srp.serving.logprobs import PromptScore, score_prompts
from megatron_srp.tokenizer import SRPTokenizer


class QueueFull(RuntimeError):
    """The engine already holds ``max_queue`` waiting requests."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the server is busy; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    """One choice of one request: its prompt ids, how to decode it, and where the answer goes.

    ``method`` is a decoding config (``GenerationConfig``, ``SafeBeamConfig``, ``GuardConfig``);
    for sampling, ``max_new_tokens`` is this job's own limit. ``on_token(token, logits)`` (if
    set) sees every new token as it is drawn (streaming, logprobs, stop strings) and returns
    True to end the answer there; it also sees the end-of-document token that ends an answer
    (not part of the answer), so its log-probability can be reported. The future receives a
    :class:`GenerationResult`, or for :class:`PromptScore` the prompt's
    :class:`~.logprobs.TokenLogprob` list."""

    prompt_ids: list[int]
    method: Any
    seed: int = 0
    choice: int = 0
    on_token: Optional[Callable[[int, torch.Tensor], bool]] = None
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)
    started: Optional[float] = None
    first_token: Optional[float] = None

    def batch_key(self) -> tuple:
        """Jobs with equal keys may share a batch."""
        m = self.method
        if isinstance(m, GenerationConfig):
            return ("sample", m.temperature, m.top_k, m.top_p, m.stop_at_eod)
        if isinstance(m, PromptScore):
            return ("score", m.top)
        return (type(m).__name__, repr(asdict(m)))

    @property
    def max_new_tokens(self) -> int:
        return int(self.method.max_new_tokens)


class Engine:
    """Owns the model; :meth:`submit` queues a job, a worker thread decodes batches."""

    def __init__(self, model, tokenizer: SRPTokenizer, max_batch: int = 32,
                 max_queue: int = 256, batch_wait_s: float = 0.01,
                 on_batch: Optional[Callable[[int], None]] = None) -> None:
        if max_batch < 1 or max_queue < 1 or batch_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and batch_wait_s >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.window = int(model.max_sequence_length)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._starting = threading.Lock()  # marks jobs running; withdraw() takes it too
        self.on_batch = on_batch  # called with each batch's size (metrics)
        self._tag = tag_id(tokenizer)
        self.stats: dict[str, Any] = {"batches": 0, "jobs": 0, "rejected": 0,
                                      "largest_batch": 0, "batch_sizes": {}}
        self._seconds_per_batch = 1.0
        self._thread = threading.Thread(target=self._loop, name="srp-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client side
    def submit(self, jobs: list[Job]) -> list[Future]:
        """Queue the jobs of one request together, or none of them (``QueueFull``)."""
        if self._stop.is_set():
            raise RuntimeError("the engine is shut down")
        q = self._queue
        with q.mutex:  # all choices of a request in, or none
            if q.maxsize and len(q.queue) + len(jobs) > q.maxsize:
                self.stats["rejected"] += 1
                raise QueueFull(self.retry_after_s(len(q.queue)))
            for job in jobs:
                q.queue.append(job)
                q.unfinished_tasks += 1
            q.not_empty.notify(len(jobs))
        return [job.future for job in jobs]

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet started."""
        return self._queue.qsize()

    def withdraw(self, futures: list[Future]) -> bool:
        """Cancel a request's jobs if none of them has started; False (and nothing cancelled)
        when one has."""
        with self._starting:
            if any(f.running() or f.done() for f in futures):
                return False
            for f in futures:
                f.cancel()
            return True

    def retry_after_s(self, waiting: int) -> float:
        """How long ``waiting`` requests take to drain at the recent pace (at least 1 s)."""
        batches = waiting / self.max_batch + 1
        return max(1.0, round(batches * self._seconds_per_batch))

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker side
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            # Keep collecting while requests keep coming (each within batch_wait_s of the one
            # before, at most 10 windows in all): clients answered together by the last batch
            # come back within milliseconds of each other, and should form the next one.
            batch = [first]
            limit = time.monotonic() + 10 * self.batch_wait_s
            while len(batch) < self.max_batch:
                wait = min(self.batch_wait_s, limit - time.monotonic())
                try:
                    batch.append(self._queue.get(timeout=max(0.0, wait)))
                except queue.Empty:
                    break
            for group in self._groups(batch):
                started = time.monotonic()
                self._run(group)
                self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * (
                    time.monotonic() - started)

    def _groups(self, batch: list[Job]) -> list[list[Job]]:
        """Jobs that can share one decoding call: the same settings, and together within the
        context window (the longest prompt plus the longest answer)."""
        groups: list[list[Job]] = []
        by_key: dict[tuple, list[Job]] = {}
        for job in batch:
            by_key.setdefault(job.batch_key(), []).append(job)
        for jobs in by_key.values():
            current: list[Job] = []
            for job in sorted(jobs, key=lambda j: len(j.prompt_ids)):
                longest = max([len(j.prompt_ids) for j in current + [job]])
                answer = max([j.max_new_tokens for j in current + [job]])
                if current and longest + answer > self.window:
                    groups.append(current)
                    current = []
                current.append(job)
            groups.append(current)
        return groups

    def _run(self, jobs: list[Job]) -> None:
        with self._starting:
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        now = time.monotonic()
        for job in live:
            job.started = now
        if self.on_batch is not None:
            self.on_batch(len(live))
        self.stats["batches"] += 1
        self.stats["jobs"] += len(live)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
        sizes = self.stats["batch_sizes"]  # how many batches of each size ran
        sizes[str(len(live))] = sizes.get(str(len(live)), 0) + 1
        try:
            if isinstance(live[0].method, GenerationConfig):
                results = self._sample(live)
            elif isinstance(live[0].method, PromptScore):
                results = score_prompts(self.model, self.tokenizer, [j.prompt_ids for j in live],
                                        live[0].method.top)
            else:
                results = decode_ids(self.model, self.tokenizer,
                                     [j.prompt_ids for j in live], live[0].method)
        except Exception as exc:  # the batch fails; the server reports it and keeps serving
            for job in live:
                job.future.set_exception(exc)
            return
        for job, result in zip(live, results):
            job.future.set_result(result)

    def _sample(self, jobs: list[Job]) -> list[GenerationResult]:
        limits = [j.max_new_tokens for j in jobs]
        # The end-of-document tokens end a row here rather than in sample_ids, so the choice
        # sees the token (and its log-probability) that ended it.
        eod = set(self.tokenizer.stop_ids) if jobs[0].method.stop_at_eod else set()
        gen = replace(jobs[0].method, max_new_tokens=max(limits), stop_at_eod=False)
        dev = _device_of(self.model)
        generators = [_row_generator(j.seed, j.choice, dev) for j in jobs]
        ended: dict[int, int] = {}

        def observe(row: int, token: int, logits: torch.Tensor) -> bool:
            job = jobs[row]
            if job.first_token is None:
                job.first_token = time.monotonic()
            on_token = job.on_token
            if token in eod:
                ended[row] = token
                if on_token is not None:
                    on_token(token, logits)
                return True
            return on_token is not None and bool(on_token(token, logits))

        out = sample_ids(self.model, self.tokenizer, [j.prompt_ids for j in jobs], gen,
                         stop_ids=[self._tag], limits=limits, generators=generators,
                         observe=observe)
        results = []
        for row, (j, (ids, stop)) in enumerate(zip(jobs, out)):
            if row in ended:
                ids, stop = ids[:-1], ended[row]
            results.append(finish_result(self.tokenizer, j.prompt_ids, ids, stop, self._tag))
        return results


def new_seed(counter=itertools.count(int(time.time()))) -> int:
    """A seed for a request that gave none (each such request samples differently)."""
    return next(counter) % (2**31)
