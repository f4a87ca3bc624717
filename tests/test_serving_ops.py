"""tools/serve_srp.py as an operator runs it, as a real subprocess on loopback: the API key
(the ``openai`` client with and without it), each limit refused by name (body size, prompt
tokens, n x max_tokens, queue wait), ``/metrics`` scraped under a bounded load and checked
against what was sent, and SIGTERM draining requests in flight before exiting 0."""
from __future__ import annotations

import concurrent.futures as cf
import re
import time

import httpx
import pytest

from megatron_srp.bench.serve import ServerProcess
from megatron_srp.serving.server import model_name

KEY = "sk-test-7f3a"


@pytest.fixture(scope="module")
def keyed(tiny_long_context, tmp_path_factory):
    """A server with an API key and small limits."""
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    with ServerProcess(tiny_long_context, ["--max-batch", "8", "--api-key", KEY,
                                           "--max-body-bytes", "4096",
                                           "--max-prompt-tokens", "64",
                                           "--max-n-tokens", "96"], log_path=log) as srv:
        srv.name = model_name(tiny_long_context)
        yield srv


def _root(srv) -> str:
    return srv.base_url.removesuffix("/v1")


def _post(srv, path: str, body, key=KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(srv.base_url + path, json=body, headers=headers, timeout=120, **kw)


def test_the_api_key_with_the_openai_client(keyed):
    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=keyed.base_url, api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == [keyed.name]
    done = good.completions.create(model=keyed.name, prompt="ROMEO:", max_tokens=4,
                                   temperature=0)
    assert done.usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=keyed.base_url, api_key="sk-wrong", max_retries=0)
    for call in (lambda: bad.models.list(),
                 lambda: bad.completions.create(model=keyed.name, prompt="x", max_tokens=2),
                 lambda: bad.chat.completions.create(
                     model=keyed.name, messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(openai.AuthenticationError) as err:
            call()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    none = httpx.post(keyed.base_url + "/completions", timeout=30,
                      json={"model": keyed.name, "prompt": "x", "max_tokens": 2})
    assert none.status_code == 401 and none.json()["error"]["code"] == "invalid_api_key"
    assert none.headers["WWW-Authenticate"] == "Bearer"
    # /health and /metrics need no key
    assert httpx.get(_root(keyed) + "/health", timeout=30).json()["status"] == "ok"
    assert "srp_requests_total" in httpx.get(_root(keyed) + "/metrics", timeout=30).text


def test_each_limit_is_refused_by_name(keyed):
    body = {"model": keyed.name, "prompt": "word " * 2000, "max_tokens": 2}
    r = _post(keyed, "/completions", body)  # ~10 kB
    assert r.status_code == 413 and r.json()["error"]["code"] == "max_body_bytes", r.text
    assert "--max-body-bytes" in r.json()["error"]["message"]
    r = _post(keyed, "/completions", {"model": keyed.name, "prompt": "word " * 80,
                                      "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_prompt_tokens"
    assert r.json()["error"]["param"] == "prompt"
    r = _post(keyed, "/completions", {"model": keyed.name, "prompt": ["a b", "c d"],
                                      "max_tokens": 10, "n": 5})  # 2 x 5 x 10 = 100 > 96
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "max_n_tokens" and err["param"] == "max_tokens"
    assert "100" in err["message"] and "--max-n-tokens" in err["message"]
    r = _post(keyed, "/chat/completions", {"model": keyed.name, "n": 4, "max_tokens": 30,
                                           "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_n_tokens"
    ok = _post(keyed, "/completions", {"model": keyed.name, "prompt": ["a b", "c d"],
                                       "max_tokens": 8, "n": 6, "temperature": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 12  # 96: at the limit


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value from the Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _sum(samples: dict[str, float], pattern: str) -> float:
    return sum(v for k, v in samples.items() if re.fullmatch(pattern, k))


def test_metrics_under_load_count_what_was_sent(keyed):
    before = _samples(httpx.get(_root(keyed) + "/metrics", timeout=30).text)
    prompts = [f"KING {i}:" for i in range(12)]
    max_tokens = [3 + i % 4 for i in range(12)]

    def send(i: int) -> httpx.Response:
        return _post(keyed, "/completions", {"model": keyed.name, "prompt": prompts[i],
                                             "max_tokens": max_tokens[i], "temperature": 1.0,
                                             "seed": i})

    with cf.ThreadPoolExecutor(6) as pool:  # 12 requests, 6 at a time
        replies = list(pool.map(send, range(12)))
        bad = list(pool.map(lambda _: _post(keyed, "/completions", {"model": keyed.name,
                                                                    "prompt": "x"}, key="no"),
                            range(3)))
    assert [r.status_code for r in replies] == [200] * 12 and {r.status_code for r in bad} == {401}
    usage = [r.json()["usage"] for r in replies]
    after = _samples(httpx.get(_root(keyed) + "/metrics", timeout=30).text)

    def delta(pattern: str) -> float:
        return _sum(after, pattern) - _sum(before, pattern)

    ok = r'srp_requests_total\{route="/v1/completions",status="200"\}'
    assert delta(ok) == 12
    assert delta(r'srp_requests_total\{route="/v1/completions",status="401"\}') == 3
    assert delta(r'srp_rejected_requests_total\{cause="unauthorized"\}') == 3
    assert delta(r"srp_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert delta(r"srp_generated_tokens_total") == sum(u["completion_tokens"] for u in usage)
    assert delta(r'srp_request_latency_seconds_count\{route="/v1/completions"\}') == 15
    assert delta(r"srp_time_to_first_token_seconds_count") == 12
    assert delta(r"srp_batch_size_sum") == 12  # every job ran in some batch
    assert delta(r"srp_batch_size_count") < 12  # and some ran together
    assert after["srp_queue_depth"] == 0 and after["srp_requests_in_flight"] == 0


def test_a_request_waiting_too_long_gets_503_with_retry_after(tiny_long_context, tmp_path):
    """One request at a time, 0.3 s of queue wait allowed (and the key from SRP_API_KEY): a
    long answer holds the model, the request behind it is withdrawn with 503."""
    with ServerProcess(tiny_long_context, ["--max-batch", "1", "--max-queue-wait-s", "0.3",
                                           "--batch-wait-ms", "0"],
                       log_path=tmp_path / "log", env={"SRP_API_KEY": KEY}) as srv:
        name = model_name(tiny_long_context)
        assert _post(srv, "/completions", {"model": name, "prompt": "x"}, key="").status_code \
            == 401
        with cf.ThreadPoolExecutor(2) as pool:
            long = pool.submit(_post, srv, "/completions", {
                "model": name, "prompt": "ROMEO:", "max_tokens": 1000, "temperature": 1.0,
                "seed": 1, "stop": ["@@@@"]})
            time.sleep(0.5)  # the long one has started
            started = time.monotonic()
            late = _post(srv, "/completions", {"model": name, "prompt": "KING", "max_tokens": 4})
            waited = time.monotonic() - started
            assert long.result().status_code == 200
        assert late.status_code == 503, late.text
        assert late.json()["error"]["code"] == "max_queue_wait_s"
        assert int(late.headers["Retry-After"]) >= 1 and waited < 5
        stream = httpx.post(srv.base_url + "/completions", timeout=60,
                            headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": name, "prompt": "KING", "max_tokens": 4,
                                  "stream": True})
        assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
        metrics = httpx.get(srv.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
        assert 'srp_rejected_requests_total{cause="max_queue_wait_s"} 1.0' in metrics


def test_sigterm_drains_requests_in_flight_and_exits_0(tiny_long_context, tmp_path):
    srv = ServerProcess(tiny_long_context, ["--max-batch", "4", "--drain-timeout-s", "120"],
                        log_path=tmp_path / "log").start()
    name = model_name(tiny_long_context)
    try:
        body = {"model": name, "prompt": "ROMEO:", "max_tokens": 1000, "temperature": 1.0,
                "seed": 5, "stop": ["@@@@"]}
        with cf.ThreadPoolExecutor(4) as pool:
            running = [pool.submit(_post, srv, "/completions", {**body, "seed": i}, key="")
                       for i in range(4)]
            deadline = time.monotonic() + 30
            while srv.health()["in_flight"] < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert srv.health()["in_flight"] == 4
            srv.terminate()
            time.sleep(0.3)
            try:  # a new request while draining: 503 (or refused, once it has exited)
                late = _post(srv, "/completions", {"model": name, "prompt": "KING",
                                                   "max_tokens": 2}, key="")
                assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
                assert httpx.get(srv.base_url.removesuffix("/v1") + "/health",
                                 timeout=10).status_code == 503
            except httpx.ConnectError:
                pass
            answers = [f.result() for f in running]
        assert [a.status_code for a in answers] == [200] * 4
        assert all(a.json()["usage"]["completion_tokens"] >= 1 for a in answers)
        assert srv.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.base_url + "/models", timeout=5)
        log = (tmp_path / "log").read_text()
        assert "draining 4 request(s)" in log and "cut" not in log
    finally:
        srv.kill()
