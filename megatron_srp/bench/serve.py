"""The serving load benchmark, and the server-as-a-subprocess helper it (and the tests) use.

A fixed set of prompts is answered twice: offline, by ``decode`` in one batch in this process,
and through ``tools/serve_srp.py`` started as a real subprocess on 127.0.0.1, by a bounded
number of concurrent clients (threads, one pooled httpx client each) until every request is
answered. Both decode greedily with the same ``max_tokens``, so the tokens are the same work.
Reported per concurrency: requests/s, completion tokens/s, p50/p99 latency, and served
tokens/s as a share of two offline figures: all prompts in one batch, and the prompts in batches
as large as the concurrency (the largest batch that many clients can give the server).
"""
from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_TOOL = REPO_ROOT / "tools" / "serve_srp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``tools/serve_srp.py`` in a subprocess on a free loopback port; a context manager that
    waits for ``/health`` on entry and stops the server on exit."""

    def __init__(self, checkpoint: str | os.PathLike, args: Sequence[str] = (),
                 log_path: Optional[str | os.PathLike] = None, threads: int = 1,
                 port: Optional[int] = None, env: Optional[dict[str, str]] = None) -> None:
        self.checkpoint = str(checkpoint)
        self.args = list(args)
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.threads = threads
        self.env = dict(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self._log = None  # the open log file, closed when the server has stopped

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 180.0) -> "ServerProcess":
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), **self.env}
        self._log = open(self.log_path, "ab") if self.log_path else None
        log = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVE_TOOL), "--checkpoint", self.checkpoint,
             "--port", str(self.port), *self.args], cwd=REPO_ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it "
                                   f"answered (log: {self.log_path})")
            try:
                if httpx.get(self.base_url.removesuffix("/v1") + "/health",
                             timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server did not answer /health within {timeout_s:.0f} s")

    def health(self) -> dict[str, Any]:
        return httpx.get(self.base_url.removesuffix("/v1") + "/health", timeout=5.0).json()

    def terminate(self) -> None:
        """SIGTERM, without waiting: the server drains (see :meth:`wait`)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 60.0) -> int:
        """The server's exit code, once it has exited."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    completion_tokens: int
    latencies: list[float]

    def row(self, offline_tokens_per_s: float, same_batch_tokens_per_s: float
            ) -> dict[str, Any]:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
        tps = self.completion_tokens / self.seconds
        return {"concurrency": self.concurrency, "requests": self.requests,
                "seconds": round(self.seconds, 3),
                "requests_per_s": round(self.requests / self.seconds, 2),
                "tokens_per_s": round(tps, 1),
                "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * p99, 1),
                "ratio_to_offline": round(tps / offline_tokens_per_s, 3),
                "ratio_to_offline_same_batch": round(tps / same_batch_tokens_per_s, 3)}


def run_load(base_url: str, model: str, prompts: Sequence[str], max_tokens: int,
             concurrency: int) -> LoadResult:
    """Every prompt once, by ``concurrency`` client threads (each sends its next request when
    its previous one is answered).

    The clients are built before the clock starts and released together: building an
    ``httpx.Client`` costs milliseconds of CPU (its SSL context), and on a 2-core machine whose
    cores the model holds, clients built on the clock reached the server up to 70 ms apart,
    which split the first wave across batches (measured on SmolLM2-135M, docs/benchmarks.md)."""
    todo = iter(enumerate(prompts))
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    ready = threading.Barrier(concurrency + 1)

    def client() -> None:
        http = httpx.Client(timeout=300.0)
        ready.wait()
        with http:
            while True:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                t0 = time.perf_counter()
                r = http.post(base_url + "/completions", json={
                    "model": model, "prompt": item[1], "max_tokens": max_tokens,
                    "temperature": 0})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        return
                    latencies.append(dt)
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed; first: {errors[0]}")
    return LoadResult(concurrency, len(latencies), seconds, tokens[0], latencies)


def offline(checkpoint: str, prompts: Sequence[str], max_tokens: int,
            batch_sizes: Sequence[int], repeats: int = 3) -> tuple[dict[int, float], str]:
    """Offline tokens/s (best of ``repeats``) for the prompts decoded here in batches of each
    size, and the model's served name."""
    from megatron_srp.inference.generation import decode
    from megatron_srp.inference.sample import GenerationConfig, load_for_inference
    from megatron_srp.serving.server import model_name
    from megatron_srp.training.checkpoint import resolve_checkpoint

    model, tokenizer, _ = load_for_inference(resolve_checkpoint(checkpoint))
    gen = GenerationConfig(max_new_tokens=max_tokens, temperature=0)
    decode(model, tokenizer, list(prompts[:2]), gen)  # warm-up
    rates = {}
    for size in batch_sizes:
        best = 0.0
        for _ in range(repeats):
            started, tokens = time.perf_counter(), 0
            for i in range(0, len(prompts), size):
                tokens += sum(len(r.ids) for r in decode(model, tokenizer,
                                                         list(prompts[i:i + size]), gen))
            best = max(best, tokens / (time.perf_counter() - started))
        rates[size] = best
    return rates, model_name(checkpoint)


def bench_prompts(count: int, path: Optional[str] = None) -> list[str]:
    """``count`` prompts: the first words of lines of a text file (default: tinyshakespeare
    from the shared data), so every request differs."""
    if path is None:
        shared = os.environ.get("SRP_SHARED_DATA", str(REPO_ROOT.parent / "shared" / "data"))
        path = str(Path(shared) / "tinyshakespeare" / "input.txt")
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()
             if len(ln.strip().split()) >= 4]
    if len(lines) < count:
        raise ValueError(f"{path} has {len(lines)} usable lines; {count} prompts were asked for")
    return [" ".join(ln.split()[:4]) for ln in lines[:count]]


def bench_serve(checkpoint: str, requests: int = 64, max_tokens: int = 32,
                concurrency: Sequence[int] = (1, 4, 16), max_batch: int = 16,
                prompts_file: Optional[str] = None, threads: int = 2) -> dict[str, Any]:
    """The whole benchmark: offline once, then each concurrency against one server."""
    prompts = bench_prompts(requests, prompts_file)
    sizes = sorted({len(prompts), *concurrency})
    rates, name = offline(checkpoint, prompts, max_tokens, sizes)
    offline_tps = rates[len(prompts)]
    rows = []
    # No queue-wait limit: on a slow machine a request may wait for several long batches.
    with ServerProcess(checkpoint, ["--max-batch", str(max_batch), "--max-queue-wait-s", "0"],
                       threads=threads) as srv:
        # Warm-up at the largest concurrency: the first batch of a new size pays one-time
        # costs (offline's best of 3 does not count them either).
        widest = min(max(concurrency), max_batch, len(prompts))
        run_load(srv.base_url, name, prompts[:widest], max_tokens, widest)
        for c in concurrency:
            before = srv.health()
            rows.append(run_load(srv.base_url, name, prompts, max_tokens, c).row(offline_tps,
                                                                                 rates[c]))
            after = srv.health()
            rows[-1]["mean_batch"] = round((after["jobs"] - before["jobs"])
                                           / max(1, after["batches"] - before["batches"]), 2)
        stats = srv.health()
    return {"checkpoint": checkpoint, "requests": requests, "max_tokens": max_tokens,
            "max_batch": max_batch, "threads": threads,
            "offline_tokens_per_s": {str(k): round(v, 1) for k, v in rates.items()},
            "served": rows, "server_stats": stats}


def markdown(result: dict[str, Any]) -> str:
    off = result["offline_tokens_per_s"]
    lines = ["offline tokens/s by batch size: " + ", ".join(f"{k}: {v}" for k, v in off.items()),
             "", "| concurrency | req/s | tokens/s | p50 ms | p99 ms | mean batch | ÷ offline, "
             f"one batch of {result['requests']} | ÷ offline, batches of the concurrency |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["served"]:
        lines.append(f"| {r['concurrency']} | {r['requests_per_s']} | {r['tokens_per_s']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} | "
                     f"{r['ratio_to_offline']:.2f} | "
                     f"{r['ratio_to_offline_same_batch']:.2f} |")
    return "\n".join(lines) + "\n"
