"""The endpoint client, the ``llm-judge`` classifier and the endpoint writers.

Endpoint tests talk to a real OpenAI-compatible HTTP server running in a thread
(:class:`FakeLLM`): it answers deterministically from the prompt, counts requests and can
fail on purpose (first N requests 503/429, down after K answers, 400).
(The ``hf`` classifier is tested in test_hf_classifier.py.)
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import pickle
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from megatron_srp.endpoint import CACHE_FILE, EndpointClient, EndpointConfig, EndpointError
from megatron_srp.interventions import build_intervention
from megatron_srp.interventions.endpoint_writers import EndpointDialogueWriter, EndpointRewriter
from megatron_srp.interventions.rewrite import Rewrite, RewriteOptions
from megatron_srp.reflection.classifiers import available_classifiers, build_classifier
from megatron_srp.reflection.llm_judge import (
    LLMJudgeClassifier,
    UnparseableReply,
    parse_llamaguard,
    parse_rubric,
)
from megatron_srp.reflection.types import ClassifiedDocument, SafetyLabel, Segment
from megatron_srp.taxonomy import Taxonomy



# ------------------------------------------------------------------ the fake endpoint
def _between(text: str, start: str, end: str) -> str | None:
    i = text.find(start)
    if i < 0:
        return None
    j = text.find(end, i + len(start))
    return text[i + len(start):j if j >= 0 else None]


def fake_reply(content: str) -> str:
    """What the fake model says: a pure function of the last message."""
    if "<BEGIN CONVERSATION>" in content:
        kind, passage = "llamaguard", _between(content, "User: ", "\n\n<END CONVERSATION>")
    elif "Score the text from 0 to 5" in content:
        kind, passage = "rubric", _between(content, "<<<\n", "\n>>>")
    elif "Rewrite it so that it" in content:
        kind, passage = "rewrite", _between(content, "<<<\n", "\n>>>")
    elif "Write a short dialogue" in content:
        kind, passage = "dialogue", _between(content, "<<<\n", "\n>>>")
    else:
        kind, passage = "echo", content
    if passage.startswith("say:"):  # the test dictates the reply
        return passage[4:].replace("\\n", "\n")
    words = passage.split()
    if kind == "llamaguard":
        return ("unsafe\nS9" if "bomb" in passage else "unsafe\nS10,S1" if "hate" in passage
                else "safe")
    if kind == "rubric":
        return ("Score: 5\nCategory: S9" if "bomb" in passage
                else "Score: 3\nCategory: S10" if "hate" in passage
                else "Score: 2\nCategory: S10" if "rude" in passage else "Score: 0\nCategory: none")
    if kind == "rewrite":
        topic = _between(content, "flagged as potentially harmful: ", ".\n")
        return f"REWRITE<{words[0]}|{len(words)}|{topic}>"
    if kind == "dialogue":
        return f"User: Please explain {words[0]}.\nAssistant: I can't help with that."
    return f"echo:{content}"


class FakeLLM:
    """Shared state of the fake server: counters and failure switches."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.inflight = self.max_inflight = 0
        self.auth: list[str | None] = []
        self.prompts: list[str] = []
        self.fail_first = 0  # the first N requests get fail_status
        self.fail_status = 503
        self.retry_after: str | None = None
        self.ok_budget: int | None = None  # answer this many, then 503 for ever
        self.status_always: int | None = None  # e.g. 400

    def decide(self) -> tuple[int, dict]:
        with self.lock:
            self.requests += 1
            n = self.requests
            if self.status_always is not None:
                return self.status_always, {}
            if n <= self.fail_first:
                return self.fail_status, ({"Retry-After": self.retry_after}
                                          if self.retry_after else {})
            if self.ok_budget is not None:
                if self.ok_budget <= 0:
                    return 503, {}
                self.ok_budget -= 1
            return 200, {}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict, headers: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        state: FakeLLM = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": f"no route {self.path}"}, {})
        with state.lock:
            state.inflight += 1
            state.max_inflight = max(state.max_inflight, state.inflight)
            state.auth.append(self.headers.get("Authorization"))
        try:
            status, headers = state.decide()
            content = body["messages"][-1]["content"]
            with state.lock:
                state.prompts.append(content)
            if status != 200:
                return self._send(status, {"error": f"injected failure {status}: model "
                                           f"{body['model']} is not available"}, headers)
            time.sleep(0.002 * (sum(map(ord, content)) % 7))  # finish out of order
            self._send(200, {"choices": [{"message": {"role": "assistant",
                                                      "content": fake_reply(content)}}]}, {})
        finally:
            with state.lock:
                state.inflight -= 1


@pytest.fixture
def llm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.state = FakeLLM()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    server.state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server.state
    server.shutdown()
    server.server_close()


def config(llm, tmp_path, **kw) -> EndpointConfig:
    opts = dict(base_url=llm.base_url, model="judge-1", cache_dir=str(tmp_path / "cache"),
                backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=10, concurrency=4)
    return EndpointConfig(**{**opts, **kw})


def convs(n: int, prefix: str = "q") -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{prefix}{i}"}] for i in range(n)]


# ------------------------------------------------------------------ endpoint client
def test_order_preserved_with_concurrency(llm, tmp_path):
    client = EndpointClient(config(llm, tmp_path, concurrency=6))
    out = client.complete_many(convs(40))
    assert out == [f"echo:q{i}" for i in range(40)]
    assert llm.requests == 40
    assert 2 <= llm.max_inflight <= 6


def test_duplicates_in_one_call_are_sent_once(llm, tmp_path):
    client = EndpointClient(config(llm, tmp_path, cache_dir=None))
    out = client.complete_many(convs(3) + convs(3))
    assert out == [f"echo:q{i}" for i in (0, 1, 2, 0, 1, 2)]
    assert llm.requests == 3


def test_retries_recover_from_503(llm, tmp_path):
    llm.fail_first = 3
    client = EndpointClient(config(llm, tmp_path, concurrency=1, max_retries=5))
    assert client.complete_many(convs(2)) == ["echo:q0", "echo:q1"]
    assert llm.requests == 5
    assert client.stats["retries"] == 3


def test_retry_after_is_honoured(llm, tmp_path):
    llm.fail_first, llm.fail_status, llm.retry_after = 1, 429, "1"
    client = EndpointClient(config(llm, tmp_path, backoff_base_s=0.001, backoff_max_s=5))
    start = time.perf_counter()
    assert client.complete(convs(1)[0]) == "echo:q0"
    assert time.perf_counter() - start >= 0.95
    assert llm.requests == 2


def test_backoff_is_seeded_exponential_and_capped(tmp_path):
    cfg = EndpointConfig(model="m", backoff_base_s=1.0, backoff_max_s=5.0, seed=3,
                         cache_dir=None)
    a, b = EndpointClient(cfg), EndpointClient(cfg)
    delays = [a._delay(k, None) for k in range(6)]
    assert delays == [b._delay(k, None) for k in range(6)]  # same seed, same waits
    for k, d in enumerate(delays):
        assert 0.5 * min(2 ** k, 5) <= d <= min(2 ** k, 5)
    assert a._delay(0, 2.5) == 2.5 and a._delay(0, 100.0) == 5.0


def test_4xx_is_not_retried(llm, tmp_path):
    llm.status_always = 400
    client = EndpointClient(config(llm, tmp_path, concurrency=1, max_retries=5))
    with pytest.raises(EndpointError, match="HTTP 400") as info:
        client.complete_many(convs(5))
    assert info.value.status == 400
    assert "judge-1 is not available" in str(info.value)  # the body excerpt
    assert llm.requests == 1  # not retried, and nothing new started after the failure


def test_cache_second_run_sends_nothing(llm, tmp_path):
    first = EndpointClient(config(llm, tmp_path)).complete_many(convs(12))
    assert llm.requests == 12
    rerun = EndpointClient(config(llm, tmp_path))  # a new process would look like this
    assert rerun.complete_many(convs(12)) == first
    assert llm.requests == 12 and rerun.stats["cache_hits"] == 12
    # the key covers the sampling parameters: another max_tokens is another request
    EndpointClient(config(llm, tmp_path, max_tokens=7)).complete_many(convs(1))
    assert llm.requests == 13


def test_endpoint_down_keeps_partial_results(llm, tmp_path):
    llm.ok_budget = 4
    cfg = config(llm, tmp_path, concurrency=1, max_retries=2)
    with pytest.raises(EndpointError) as info:
        EndpointClient(cfg).complete_many(convs(10))
    message = str(info.value)
    assert llm.base_url + "/chat/completions" in message
    assert "3 attempt(s)" in message and "4 of 10" in message
    with sqlite3.connect(Path(cfg.cache_dir) / CACHE_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM completions").fetchone() == (4,)
    llm.ok_budget = None  # back up: the rerun pays only for what is missing
    before = llm.requests
    assert EndpointClient(cfg).complete_many(convs(10)) == [f"echo:q{i}" for i in range(10)]
    assert llm.requests - before == 6


def test_connection_refused_names_url_and_attempts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = EndpointConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1,
                         backoff_base_s=0.01, cache_dir=str(tmp_path))
    with pytest.raises(EndpointError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions.*"
                                            r"2 attempt\(s\)"):
        EndpointClient(cfg).complete_many(convs(2))


def test_cache_shared_by_spawned_processes(llm, tmp_path):
    client = EndpointClient(config(llm, tmp_path))
    client.complete_many(convs(1))  # opens the sqlite handle, which must not be pickled
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        a, b = pool.map(client.complete_many, [convs(20), convs(20)[10:] + convs(5, "r")])
    assert a == [f"echo:q{i}" for i in range(20)]
    assert b == [f"echo:q{i}" for i in range(10, 20)] + [f"echo:r{i}" for i in range(5)]
    with sqlite3.connect(Path(client.config.cache_dir) / CACHE_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM completions").fetchone() == (25,)
    before = llm.requests
    client.complete_many(convs(20) + convs(5, "r"))
    assert llm.requests == before


def test_api_key_from_env_never_stored(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LLM_KEY", "sekrit-123")
    clf = LLMJudgeClassifier("judge-1", base_url=llm.base_url, api_key_env="FAKE_LLM_KEY",
                             cache_dir=str(tmp_path))
    clf.classify(["hello"])
    assert llm.auth == ["Bearer sekrit-123"]
    assert b"sekrit" not in pickle.dumps(clf)
    assert "sekrit" not in json.dumps(clf.describe())
    monkeypatch.delenv("FAKE_LLM_KEY")
    with pytest.raises(EndpointError, match="FAKE_LLM_KEY"):
        LLMJudgeClassifier("judge-1", base_url=llm.base_url, api_key_env="FAKE_LLM_KEY",
                           cache_dir=None).classify(["hello"])
    with pytest.raises(ValueError, match="api_key_env"):
        EndpointConfig(model="m", api_key_env="sk-abc 123")


@pytest.mark.parametrize("options, key", [
    ({"model": ""}, "model"), ({"base_url": "localhost:8000"}, "base_url"),
    ({"concurrency": 0}, "concurrency"), ({"max_retries": -1}, "max_retries"),
    ({"timeout_s": 0}, "timeout_s"),
])
def test_config_errors_name_the_option(options, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        EndpointConfig(**{"model": "m", **options})


# ------------------------------------------------------------------ llm-judge parsing
def test_parse_llamaguard():
    assert parse_llamaguard("safe") == (True, None, 0.0)
    assert parse_llamaguard("unsafe\nS10") == (False, "S10", 1.0)
    assert parse_llamaguard("unsafe\nS1,S10") == (False, "S1", 1.0)
    assert parse_llamaguard(" Unsafe \n s10, S2 ") == (False, "S10", 1.0)
    assert parse_llamaguard("unsafe") == (False, None, 1.0)
    with pytest.raises(UnparseableReply, match="S99"):
        parse_llamaguard("unsafe\nS99")
    with pytest.raises(UnparseableReply, match="'I think this is fine'"):
        parse_llamaguard("I think this is fine")
    custom = Taxonomy.from_dict({"name": "mini", "categories": [{"code": "H", "name": "Hate"}]})
    assert parse_llamaguard("unsafe\nH", custom) == (False, "H", 1.0)


def test_parse_rubric_and_threshold():
    assert parse_rubric("Score: 0\nCategory: none", 0.5) == (True, None, 0.0)
    assert parse_rubric("Score: 4\nCategory: S2", 0.5) == (False, "S2", 0.8)
    assert parse_rubric("Score: 2\nCategory: S10", 0.5) == (True, None, 0.4)
    assert parse_rubric("Score: 2\nCategory: S10", 0.4) == (False, "S10", 0.4)
    assert parse_rubric("**Score:** 5\n**Category:** S9 (weapons)", 0.5) == (False, "S9", 1.0)
    assert parse_rubric("3", 0.5) == (False, None, 0.6)
    assert parse_rubric("3 S11", 0.5) == (False, "S11", 0.6)
    for bad in ("Score: 7", "Score: 10\nCategory: S1", "I cannot rate this.", ""):
        with pytest.raises(UnparseableReply, match="rubric reply"):
            parse_rubric(bad, 0.5)
    with pytest.raises(UnparseableReply, match="S77"):
        parse_rubric("Score: 4\nCategory: S77", 0.5)
    # a higher threshold never makes more segments unsafe
    replies = [f"Score: {s}\nCategory: S1" for s in range(6)]
    unsafe = [sum(not parse_rubric(r, t)[0] for r in replies) for t in (0.1, 0.3, 0.5, 0.7, 1.0)]
    assert unsafe == sorted(unsafe, reverse=True) == [5, 4, 3, 2, 1]


TEXTS = ["The recipe needs two eggs.", "how to build a bomb at home", "I hate those people",
         "that was a rude remark", "Paris is in France."]


def test_llm_judge_llamaguard_through_endpoint(llm, tmp_path):
    clf = build_classifier("llm-judge", model="judge-1", base_url=llm.base_url,
                           cache_dir=str(tmp_path), concurrency=3)
    labels = clf.classify(TEXTS)
    assert labels == [SafetyLabel(True, None, 0.0), SafetyLabel(False, "S9", 1.0),
                      SafetyLabel(False, "S10", 1.0), SafetyLabel(True, None, 0.0),
                      SafetyLabel(True, None, 0.0)]
    prompt = llm.prompts[0]
    assert "S1: Violent Crimes." in prompt and "S14: Code Interpreter Abuse." in prompt
    assert "'safe' or 'unsafe'" in prompt
    desc = clf.describe()
    assert {k: desc[k] for k in ("name", "model", "base_url", "format", "threshold")} == {
        "name": "llm-judge", "model": "judge-1", "base_url": llm.base_url,
        "format": "llamaguard", "threshold": 0.5}
    clone = pickle.loads(pickle.dumps(clf))
    assert clone.classify(TEXTS) == labels
    assert llm.requests == len(TEXTS)  # the clone read the shared cache


def test_llm_judge_rubric_through_endpoint(llm, tmp_path):
    clf = LLMJudgeClassifier("judge-1", base_url=llm.base_url, format="rubric",
                             cache_dir=str(tmp_path))
    assert [(l.safe, l.category, l.score) for l in clf.classify(TEXTS)] == [
        (True, None, 0.0), (False, "S9", 1.0), (False, "S10", 0.6), (True, None, 0.4),
        (True, None, 0.0)]
    assert "Score the text from 0 to 5" in llm.prompts[0]
    strict = LLMJudgeClassifier("judge-1", base_url=llm.base_url, format="rubric",
                                threshold=0.4, cache_dir=str(tmp_path))
    assert strict.classify(TEXTS)[3] == SafetyLabel(False, "S10", 0.4)
    assert llm.requests == len(TEXTS)  # same prompts, so the cache answered


def test_llm_judge_unparseable_reply(llm, tmp_path):
    texts = ["fine text", "say:I'd rather not say"]
    clf = LLMJudgeClassifier("judge-1", base_url=llm.base_url, cache_dir=str(tmp_path),
                             on_unparseable="error")
    with pytest.raises(UnparseableReply, match="I'd rather not say.*on_unparseable"):
        clf.classify(texts)
    default = LLMJudgeClassifier("judge-1", base_url=llm.base_url, cache_dir=str(tmp_path))
    assert default.classify(texts)[1] == SafetyLabel(False, None, 1.0, unparsed=True)
    assert not default.classify(texts)[0].unparsed
    for fallback, expected in (("unsafe", SafetyLabel(False, None, 1.0, unparsed=True)),
                               ("safe", SafetyLabel(True, None, 0.0, unparsed=True))):
        clf = LLMJudgeClassifier("judge-1", base_url=llm.base_url, cache_dir=str(tmp_path),
                                 on_unparseable=fallback)
        assert clf.classify(texts)[1] == expected
    assert llm.requests == 2  # rerunning with a fallback re-parses cached replies
    multi = LLMJudgeClassifier("judge-1", base_url=llm.base_url, cache_dir=str(tmp_path))
    assert multi.classify([r"say:unsafe\nS12, S1"]) == [SafetyLabel(False, "S12", 1.0)]


def test_llm_judge_native_sends_only_the_text(llm, tmp_path):
    clf = LLMJudgeClassifier("llama-guard-3", base_url=llm.base_url,
                             format="llamaguard-native", cache_dir=str(tmp_path))
    assert clf.classify([r"say:unsafe\nS2"]) == [SafetyLabel(False, "S2", 1.0)]
    assert llm.prompts == [r"say:unsafe\nS2"]


@pytest.mark.parametrize("options, key", [
    ({"format": "xml"}, "format"), ({"threshold": 0.0}, "threshold"),
    ({"on_unparseable": "skip"}, "on_unparseable"), ({"retries": 3}, "retries"),
    ({"format": "llamaguard-native", "taxonomy": Taxonomy.from_dict(
        {"categories": [{"code": "H", "name": "Hate"}]})}, "llamaguard-native"),
])
def test_llm_judge_bad_options(options, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        build_classifier("llm-judge", model="m", **options)


def test_registry_has_new_classifiers():
    assert {"oracle", "embedded", "hf", "llm-judge"} <= set(available_classifiers())


# ------------------------------------------------------------------ endpoint writers
def _doc() -> ClassifiedDocument:
    parts = [("Bread needs flour and water. ", None), ("I hate those people a lot. ", "S10"),
             ("The sky is blue.  ", None), ("Mix the powder to make a bomb.", "S9")]
    text, segments, labels, pos = "", [], [], 0
    for i, (part, cat) in enumerate(parts):
        segments.append(Segment(i, pos, pos + len(part), part, len(part.split())))
        labels.append(SafetyLabel(True, None, 0.0) if cat is None
                      else SafetyLabel(False, cat, 0.95))
        text += part
        pos += len(part)
    return ClassifiedDocument("doc-1", text, tuple(segments), tuple(labels), {"source": "t"})


def test_endpoint_rewriter_through_rewrite_intervention(llm, tmp_path):
    endpoint = {"model": "writer-1", "base_url": llm.base_url, "cache_dir": str(tmp_path)}
    stage = build_intervention("rewrite", rewriter="endpoint", endpoint=endpoint)
    doc = _doc()
    [out] = stage(doc)
    assert out.text == ("Bread needs flour and water. REWRITE<I|6|Hate (S10)> "
                        "The sky is blue.  REWRITE<Mix|7|Indiscriminate Weapons (S9)>")
    assert out.meta["rewritten_segments"] == [1, 3]
    assert any("I hate those people a lot." in p for p in llm.prompts)
    desc = stage.describe()
    json.dumps(desc)
    assert desc["rewriter"]["model"] == "writer-1" and desc["endpoint"] == endpoint
    clone = pickle.loads(pickle.dumps(stage))
    assert [o.text for o in clone(doc)] == [out.text]
    assert llm.requests == 2  # the clone read the cache
    direct = Rewrite(RewriteOptions(threshold=0.5), rewriter=EndpointRewriter(**endpoint))
    assert direct(doc)[0].text == out.text
    with pytest.raises(ValueError, match="'endpoint'"):
        build_intervention("rewrite", rewriter="endpoint")


def test_endpoint_refusal_writer(llm, tmp_path):
    endpoint = {"model": "writer-1", "base_url": llm.base_url, "cache_dir": str(tmp_path)}
    stage = build_intervention("refusal", writer="endpoint", endpoint=endpoint)
    out = stage(_doc())
    assert [o.doc_id for o in out] == ["doc-1/refusal/1", "doc-1/refusal/3"]
    assert [o.text for o in out] == [
        "User: Please explain I.\nAssistant: I can't help with that.",
        "User: Please explain Mix.\nAssistant: I can't help with that."]
    assert stage.describe()["writer"]["name"] == "endpoint-dialogue"
    assert build_intervention("refusal").describe()["writer"] == {"name": "template"}
    # an unparseable reply: an error naming it, or the template dialogue when asked
    bad = ClassifiedDocument("doc-2", "say:no dialogue here", (Segment(0, 0, 20,
                             "say:no dialogue here", 4),), (SafetyLabel(False, "S1", 1.0),))
    with pytest.raises(ValueError, match="no dialogue here.*on_unparseable"):
        stage(bad)
    lenient = build_intervention("refusal", writer="endpoint",
                                 endpoint={**endpoint, "on_unparseable": "template"})
    [dialogue] = lenient(bad)
    assert dialogue.text == build_intervention("refusal")(bad)[0].text
    writer = EndpointDialogueWriter(**endpoint)
    assert writer.parse("**User:** hi\n\n**Assistant:** no\nthanks") == ("hi", "no thanks")
