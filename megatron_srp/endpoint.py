"""A small client for an OpenAI-compatible chat endpoint (what ``vllm serve`` and
``tools/serve_srp.py`` expose).

The LLM judge, the endpoint rewriter and the endpoint refusal writer all send many short,
independent chat requests. This client does exactly that and nothing more, on httpx (one
connection pool per process, kept alive between requests):

* ``complete_many(conversations)`` returns one reply per conversation, in order, running up to
  ``concurrency`` requests at once on threads.
* Connection errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff and jitter
  (seeded, so reruns wait the same); a ``Retry-After`` header replaces the computed delay. Other
  4xx are not retried: the error names the status and an excerpt of the body.
* Every reply is stored in a sqlite cache keyed by the sha256 of model + messages + sampling
  parameters, written as soon as it arrives, so a rerun never pays twice and a run that dies
  halfway resumes. sqlite (WAL, busy timeout) lets several worker processes share the file.
* When the endpoint stays down, :class:`EndpointError` names the URL and the attempts; the
  answers that did arrive are already in the cache.

The API key is read from the environment variable named by ``api_key_env`` at request time,
so it is never stored in configs, dataset metadata or pickles.
"""
from __future__ import annotations

import concurrent.futures as cf
import email.utils
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import httpx

Messages = Sequence[Mapping[str, str]]
DEFAULT_CACHE_DIR = "~/.cache/megatron_srp/endpoint"
CACHE_FILE = "completions.sqlite"
_RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))


class EndpointError(RuntimeError):
    """The endpoint could not answer: down after all retries, or a non-retryable reply."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EndpointConfig:
    """Where to send requests and how hard to try. ``cache_dir=None`` turns the cache off."""

    base_url: str = "http://localhost:8000/v1"  # requests go to {base_url}/chat/completions
    model: str = ""
    api_key_env: Optional[str] = None  # name of the env var holding the key (never the key)
    temperature: float = 0.0
    max_tokens: int = 512
    timeout_s: float = 60.0  # per request
    concurrency: int = 8  # requests in flight at once
    max_retries: int = 5  # retries after the first attempt
    backoff_base_s: float = 1.0  # delay before retry k: base * 2**k, capped, times jitter
    backoff_max_s: float = 60.0  # also caps Retry-After
    seed: int = 0  # seeds the backoff jitter
    cache_dir: Optional[str] = DEFAULT_CACHE_DIR

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint option 'base_url' must start with http:// or https://, "
                             f"got {self.base_url!r}")
        if not self.model:
            raise ValueError("endpoint option 'model' is required (the served model name)")
        if self.api_key_env is not None and not self.api_key_env.isidentifier():
            raise ValueError("endpoint option 'api_key_env' is the NAME of an environment "
                             "variable (e.g. OPENAI_API_KEY), not the key itself")
        for key, low in (("temperature", 0.0), ("timeout_s", 1e-3), ("backoff_base_s", 0.0),
                         ("backoff_max_s", 0.0)):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < low:
                raise ValueError(f"endpoint option {key!r} must be a number >= {low}, "
                                 f"got {getattr(self, key)!r}")
        for key, low in (("max_tokens", 1), ("concurrency", 1), ("max_retries", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"endpoint option {key!r} must be an integer >= {low}, "
                                 f"got {value!r}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **defaults: Any) -> EndpointConfig:
        """``EndpointConfig(**defaults, **options)``; an unknown key names the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown endpoint option(s) {', '.join(map(repr, unknown))}; "
                             f"expected {', '.join(known)}")
        return cls(**{**defaults, **options})

    def describe(self) -> dict[str, Any]:
        """The config for dataset metadata (it holds no secret: only the env var's name)."""
        return asdict(self)


def cache_key(model: str, messages: Messages, temperature: float, max_tokens: int) -> str:
    """sha256 of everything that determines a reply (the URL does not: same model, same answer)."""
    payload = {"model": model, "messages": [dict(m) for m in messages],
               "temperature": temperature, "max_tokens": max_tokens}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: Optional[float] = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class EndpointClient:
    """Chat completions with retries, concurrency and a shared on-disk cache (picklable)."""

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = None
        self._db_pid: Optional[int] = None
        self._http: Optional[httpx.Client] = None
        self._http_pid: Optional[int] = None
        self.stats = {"cache_hits": 0, "requests": 0, "retries": 0}

    def close(self) -> None:
        """Close this process's sqlite handle and connections (reopened on the next use)."""
        if self._db is not None and self._db_pid == os.getpid():
            self._db.close()
        if self._http is not None and self._http_pid == os.getpid():
            self._http.close()
        self._db = self._http = None

    def _client(self) -> httpx.Client:
        """This process's connection pool (never shared across fork)."""
        with self._lock:
            if self._http is None or self._http_pid != os.getpid():
                width = self.config.concurrency
                self._http = httpx.Client(timeout=self.config.timeout_s, limits=httpx.Limits(
                    max_connections=width, max_keepalive_connections=width))
                self._http_pid = os.getpid()
            return self._http

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to clean up
            pass

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "_rng": self._rng}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------ cache
    @property
    def cache_path(self) -> Optional[Path]:
        if self.config.cache_dir is None:
            return None
        return Path(self.config.cache_dir).expanduser() / CACHE_FILE

    def _conn(self) -> Optional[sqlite3.Connection]:
        """The sqlite handle, opened on first use in this process (never shared across fork)."""
        path = self.cache_path
        if path is None:
            return None
        if self._db is None or self._db_pid != os.getpid():
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=60.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, "
                       "model TEXT NOT NULL, reply TEXT NOT NULL, created REAL NOT NULL)")
            self._db, self._db_pid = db, os.getpid()
        return self._db

    def _cache_get(self, keys: Sequence[str]) -> dict[str, str]:
        with self._lock:
            db = self._conn()
            if db is None:
                return {}
            found: dict[str, str] = {}
            unique = list(dict.fromkeys(keys))
            for i in range(0, len(unique), 500):
                chunk = unique[i:i + 500]
                rows = db.execute(f"SELECT key, reply FROM completions WHERE key IN "
                                  f"({','.join('?' * len(chunk))})", chunk).fetchall()
                found.update(rows)
            return found

    def _cache_put(self, key: str, reply: str) -> None:
        with self._lock:
            db = self._conn()
            if db is not None:
                db.execute("INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?)",
                           (key, self.config.model, reply, time.time()))

    # ------------------------------------------------------------------ requests
    def key(self, messages: Messages) -> str:
        c = self.config
        return cache_key(c.model, messages, c.temperature, c.max_tokens)

    def complete(self, messages: Messages) -> str:
        return self.complete_many([messages])[0]

    def complete_many(self, conversations: Sequence[Messages]) -> list[str]:
        """One reply per conversation, in order; cached replies cost no request."""
        keys = [self.key(m) for m in conversations]
        replies = self._cache_get(keys)
        self.stats["cache_hits"] += sum(k in replies for k in keys)
        todo = {k: m for k, m in zip(keys, conversations) if k not in replies}
        if todo:
            self._fetch(todo, replies)
        return [replies[k] for k in keys]

    def _fetch(self, todo: dict[str, Messages], replies: dict[str, str]) -> None:
        """Send ``todo``, at most ``concurrency`` at a time, caching each reply on arrival. After
        the first failure nothing new starts; running requests finish (and are cached)."""
        queue = iter(todo.items())
        running: dict[cf.Future, str] = {}
        failure: Optional[EndpointError] = None
        width = min(self.config.concurrency, len(todo))
        with cf.ThreadPoolExecutor(max_workers=width) as pool:
            def submit_next() -> None:
                item = next(queue, None)
                if item is not None:
                    running[pool.submit(self._request, item[1])] = item[0]

            for _ in range(width):
                submit_next()
            while running:
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    key = running.pop(future)
                    try:
                        replies[key] = future.result()
                    except EndpointError as exc:
                        failure = failure or exc
                        continue
                    self._cache_put(key, replies[key])
                    if failure is None:
                        submit_next()
        if failure is not None:
            arrived = sum(k in replies for k in todo)
            where = f"cached in {self.cache_path}" if self.cache_path else "not cached"
            raise EndpointError(f"{failure} ({arrived} of {len(todo)} new answers arrived and "
                                f"are {where}; rerun to resume)", status=failure.status)

    def _request(self, messages: Messages) -> str:
        c = self.config
        attempts = c.max_retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
            try:
                return self._post(messages)
            except _Retryable as exc:
                last = str(exc)
                if attempt + 1 < attempts:
                    time.sleep(self._delay(attempt, exc.retry_after))
        raise EndpointError(f"endpoint {c.url} failed after {attempts} attempt(s); "
                            f"last error: {last}")

    def _delay(self, attempt: int, retry_after: Optional[float]) -> float:
        c = self.config
        if retry_after is not None:
            return min(retry_after, c.backoff_max_s)
        with self._lock:
            jitter = 0.5 + 0.5 * self._rng.random()
        return min(c.backoff_base_s * 2 ** attempt, c.backoff_max_s) * jitter

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        env = self.config.api_key_env
        if env is not None:
            key = os.environ.get(env)
            if not key:
                raise EndpointError(f"endpoint option 'api_key_env' names {env!r}, "
                                    "but that environment variable is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, messages: Messages) -> str:
        c = self.config
        body = {"model": c.model, "messages": [dict(m) for m in messages],
                "temperature": c.temperature, "max_tokens": c.max_tokens}
        headers = self._headers()
        with self._lock:
            self.stats["requests"] += 1
        try:
            response = self._client().post(c.url, json=body, headers=headers)
        except httpx.HTTPError as exc:  # refused, reset, timed out: worth another try
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            excerpt = response.text[:500].strip()
            reason = f"HTTP {response.status_code} from {c.url}: {excerpt!r}"
            if response.status_code in _RETRY_STATUS:
                raise _Retryable(reason, _retry_after(response.headers.get("Retry-After")))
            raise EndpointError(f"endpoint {c.url} answered HTTP {response.status_code} (not "
                                f"retried): {excerpt!r}", status=response.status_code)
        try:
            return response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(f"endpoint {c.url} sent a reply that is not a chat completion: "
                                f"{response.text[:300]!r}") from None
