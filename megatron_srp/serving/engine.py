"""The engine behind the server: one thread owns the model, requests wait in a bounded queue,
and the model decodes many of them at once.

Sampling requests (greedy, top-k, top-p) run on a *continuous* batch (batch.py): a request
joins the running batch at the next step when it fits, and leaves it, answered, as soon as it
is done. Requests that share ``temperature``, ``top_k`` and ``top_p`` share the batch whatever
their lengths, seeds and ``max_tokens``; each row has its own random stream (seeded by the
request's ``seed`` and the choice index), so a seeded request gets the same answer alone or in
company. SafeBeam, beam and reflection-guarded requests run as *dynamic* batches of requests
with the same settings, each to its end. Requests are taken oldest first.

With ``max_queue`` requests waiting, :meth:`Engine.submit` raises :class:`QueueFull` at once:
the server answers 429 with ``Retry-After`` instead of letting clients hang.
"""
from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from megatron_srp.inference.generation import decode_ids
from megatron_srp.inference.results import tag_id
from megatron_srp.inference.sample import GenerationConfig
from megatron_srp.serving.batch import Job, RunningBatch
from megatron_srp.tokenizer import SRPTokenizer

__all__ = ["Engine", "Job", "QueueFull", "new_seed"]


class QueueFull(RuntimeError):
    """The engine already holds ``max_queue`` waiting requests."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the server is busy; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class Engine:
    """Owns the model; :meth:`submit` queues a job, a worker thread decodes batches."""

    def __init__(self, model, tokenizer: SRPTokenizer, max_batch: int = 32,
                 max_queue: int = 256, batch_wait_s: float = 0.01) -> None:
        if max_batch < 1 or max_queue < 1 or batch_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and batch_wait_s >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.window = int(model.max_sequence_length)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._tag = tag_id(tokenizer)
        # batches: batches started; joined: requests that joined a running batch
        self.stats: dict[str, Any] = {"batches": 0, "jobs": 0, "joined": 0, "rejected": 0,
                                      "largest_batch": 0}
        self._pending: collections.deque[Job] = collections.deque()
        self._running = RunningBatch(model, tokenizer, self.window, self._tag)
        self._seconds_per_request = 1.0
        self._thread = threading.Thread(target=self._loop, name="srp-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client side
    def submit(self, jobs: list[Job]) -> list[Future]:
        """Queue the jobs of one request together, or none of them (``QueueFull``)."""
        if self._stop.is_set():
            raise RuntimeError("the engine is shut down")
        q = self._queue
        with q.mutex:  # all choices of a request in, or none
            # waiting: in the queue, or taken by the engine thread but not yet decoding
            waiting = len(q.queue) + len(self._pending)
            if waiting + len(jobs) > self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(self.retry_after_s(waiting))
            for job in jobs:
                q.queue.append(job)
                q.unfinished_tasks += 1
            q.not_empty.notify(len(jobs))
        return [job.future for job in jobs]

    def retry_after_s(self, waiting: int) -> float:
        """How long ``waiting`` requests take to drain at the recent pace: batches of them,
        each as long as a recent request took (at least one second)."""
        batches = waiting / self.max_batch + 1
        return max(1.0, round(batches * self._seconds_per_request))

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker side
    def _loop(self) -> None:
        """Sampling requests run on the continuous batch (rows join and leave every step);
        beam and guarded requests run as dynamic batches, each to its end."""
        while not self._stop.is_set():
            if not self._running:
                if not self._pending and not self._wait_for_requests():
                    continue
                first = self._pending[0]
                if not isinstance(first.method, GenerationConfig):
                    group = [j for j in self._pending if j.batch_key() == first.batch_key()]
                    group = group[: self.max_batch]
                    for job in group:
                        self._pending.remove(job)
                    for part in self._groups(group):
                        self._run(part)
                    continue
            self._take_waiting()
            self._admit()
            if self._running:
                self._step()

    def _wait_for_requests(self) -> bool:
        """Block for a first request, then keep collecting while requests keep coming (each
        within batch_wait_s of the one before, at most 10 windows in all): clients answered
        together come back within milliseconds of each other, and should start together."""
        try:
            self._pending.append(self._queue.get(timeout=0.1))
        except queue.Empty:
            return False
        limit = time.monotonic() + 10 * self.batch_wait_s
        while len(self._pending) < self.max_batch:
            wait = min(self.batch_wait_s, limit - time.monotonic())
            try:
                self._pending.append(self._queue.get(timeout=max(0.0, wait)))
            except queue.Empty:
                break
        return True

    def _take_waiting(self) -> None:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _admit(self) -> None:
        """Start or grow the running batch from the pending requests, oldest first; stop at the
        first that cannot join now, so that nothing waits behind newer requests for ever."""
        joining: list[Job] = []
        while self._pending and len(self._running) + len(joining) < self.max_batch:
            job = self._pending[0]
            if not self._running.fits(job, joining):
                break
            self._pending.popleft()
            if job.future.set_running_or_notify_cancel():
                job.started = time.monotonic()
                joining.append(job)
        if not joining:
            return
        started = len(self._running) == 0
        try:
            self._running.admit(joining)
        except Exception as exc:  # e.g. out of memory: these requests fail, the server serves on
            for job in joining:
                job.future.set_exception(exc)
            return
        self._count(len(joining), new_batch=started)

    def _step(self) -> None:
        try:
            finished = self._running.step()
        except Exception as exc:  # the batch fails; its requests say so, the server goes on
            for row in self._running.rows:
                row.job.future.set_exception(exc)
            self._running.reset()
            return
        now = time.monotonic()
        for job, result in finished:
            job.future.set_result(result)
            self._seconds_per_request = (0.9 * self._seconds_per_request
                                         + 0.1 * (now - job.started))

    def _count(self, jobs: int, new_batch: bool) -> None:
        self.stats["jobs"] += jobs
        if new_batch:
            self.stats["batches"] += 1
        else:
            self.stats["joined"] += jobs
        size = len(self._running) if self._running else jobs
        self.stats["largest_batch"] = max(self.stats["largest_batch"], size)

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
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.stats["jobs"] += len(live)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
        try:
            results = decode_ids(self.model, self.tokenizer, [j.prompt_ids for j in live],
                                 live[0].method)
        except Exception as exc:  # the batch fails; the server reports it and keeps serving
            for job in live:
                job.future.set_exception(exc)
            return
        for job, result in zip(live, results):
            job.future.set_result(result)


def new_seed(counter=itertools.count(int(time.time()))) -> int:
    """A seed for a request that gave none (each such request samples differently)."""
    return next(counter) % (2**31)
