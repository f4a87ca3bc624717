"""tools/serve_srp.py as a real subprocess on a loopback port, serving a tiny checkpoint trained
in this test session (conftest.py's ``served_tiny``): answers equal offline decoding, batching changes nothing, streaming, stop
strings, logprobs, the project's decoding modes, every bad request a 4xx naming its field with
the server still serving, 429 with Retry-After when the queue is full, and the ``openai``
package as a client nobody here wrote."""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest

from megatron_srp.bench.serve import ServerProcess
from megatron_srp.serving.server import model_name


@pytest.fixture(scope="module")
def server(served_tiny):
    return served_tiny


def _post(srv, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(srv.base_url + path, content=body, timeout=120,
                          headers={"Content-Type": "application/json"}, **kw)
    return httpx.post(srv.base_url + path, json=body, timeout=120, **kw)


def _complete(srv, prompt, **kw) -> dict:
    r = _post(srv, "/completions", {"model": srv.name, "prompt": prompt, **kw})
    assert r.status_code == 200, r.text
    return r.json()


PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "KING"]


def test_greedy_answers_equal_offline_decoding_alone_and_batched(server):
    from megatron_srp.inference.generation import decode
    from megatron_srp.inference.sample import GenerationConfig, load_for_inference, shutdown

    model, tokenizer, _ = load_for_inference(server.checkpoint_dir)
    try:
        offline = decode(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=12,
                                                                     temperature=0))
    finally:
        shutdown()
    alone = [_complete(server, p, max_tokens=12, temperature=0) for p in PROMPTS]
    assert [a["choices"][0]["text"] for a in alone] == [r.text for r in offline]
    assert [a["usage"]["completion_tokens"] for a in alone] == [len(r.ids) for r in offline]
    with cf.ThreadPoolExecutor(8) as pool:  # the same requests, concurrently: one batch
        together = list(pool.map(lambda p: _complete(server, p, max_tokens=12, temperature=0),
                                 PROMPTS * 2))
    assert [t["choices"][0]["text"] for t in together] == [r.text for r in offline] * 2
    assert server.health()["largest_batch"] > 1
    listed = _complete(server, PROMPTS, max_tokens=12, temperature=0)  # a list of prompts
    assert [c["text"] for c in listed["choices"]] == [r.text for r in offline]


def test_requests_arriving_one_by_one_answer_as_alone(tiny_long_context):
    """The engine in this process: requests arrive one by one while batches run and are
    batched as they come, with different lengths; every greedy answer equals offline decoding,
    and a seeded one its answer alone."""
    import time

    from megatron_srp.inference.generation import decode
    from megatron_srp.inference.sample import GenerationConfig, load_for_inference, shutdown
    from megatron_srp.serving.engine import Engine, Job

    model, tokenizer, _ = load_for_inference(tiny_long_context)
    engine = Engine(model, tokenizer, max_batch=4)
    try:
        prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]
        offline = decode(model, tokenizer, prompts, GenerationConfig(max_new_tokens=16,
                                                                     temperature=0))
        futures = []
        for i, ids in enumerate(tokenizer.tokenize_batch(prompts)):
            limit = 16 - i % 5  # answers of different lengths leave at different steps
            futures += engine.submit([Job(ids, GenerationConfig(max_new_tokens=limit,
                                                                temperature=0))])
            time.sleep(0.002)
        for f, want, i in zip(futures, offline, range(len(prompts))):
            got = f.result(timeout=120)
            assert got.ids == want.ids[:16 - i % 5], (i, got.text, want.text)
        assert 1 < engine.stats["largest_batch"] <= 4 and engine.stats["batches"] > 1
        sampled = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=10)
        ids = tokenizer.tokenize_batch(prompts)
        crowd = [f.result(timeout=120) for f in engine.submit(
            [Job(p, sampled, seed=i) for i, p in enumerate(ids)])]
        alone = engine.submit([Job(ids[5], sampled, seed=5)])[0].result(timeout=120)
        assert crowd[5].ids == alone.ids and crowd[4].ids != alone.ids
    finally:
        engine.shutdown()
        shutdown()


def test_seeded_sampling_is_the_same_alone_and_in_company(server):
    one = _complete(server, "ROMEO:", max_tokens=10, temperature=1.0, seed=7, n=2)
    texts = [c["text"] for c in one["choices"]]
    assert len(texts) == 2 and texts[0] != texts[1]  # two choices, two random streams
    with cf.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(_complete, server, "KING", max_tokens=10, temperature=1.0)
                  for _ in range(3)]
        again = pool.submit(_complete, server, "ROMEO:", max_tokens=10, temperature=1.0, seed=7,
                            n=2).result()
        [f.result() for f in others]
    assert [c["text"] for c in again["choices"]] == texts


def test_stop_strings_and_logprobs(server):
    full = _complete(server, "ROMEO:", max_tokens=24, temperature=0, logprobs=2)
    text = full["choices"][0]["text"]
    lp = full["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == text and len(lp["token_logprobs"]) == len(lp["tokens"]) == 24
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) <= 2 and value <= 0
        assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy takes the best
    # Seeded sampling writes words (the tiny model's greedy answer is blank lines): cut one.
    sampled = _complete(server, "ROMEO:", max_tokens=24, temperature=1.0, seed=3)
    text = sampled["choices"][0]["text"]
    words = text.split()
    assert len(words) >= 3, text
    stop = words[len(words) // 2]
    cut = _complete(server, "ROMEO:", max_tokens=24, temperature=1.0, seed=3, stop=[stop],
                    logprobs=1)["choices"][0]
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    kept = "".join(cut["logprobs"]["tokens"])
    assert cut["text"].startswith(kept) and stop not in kept  # tokens of the stop are gone


def test_streaming_sends_the_same_text_in_pieces(server):
    want = _complete(server, "ROMEO:", max_tokens=16, temperature=0)["choices"][0]
    with httpx.stream("POST", server.base_url + "/completions", timeout=120, json={
            "model": server.name, "prompt": "ROMEO:", "max_tokens": 16, "temperature": 0,
            "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert len(chunks) > 2 and "".join(c["text"] for c in chunks) == want["text"]
    assert [c["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["finish_reason"] == want["finish_reason"]


def test_the_projects_decoding_modes_return_their_reflections(server):
    guarded = _complete(server, "ROMEO:", max_tokens=8, temperature=0, decoding="guarded")
    srp = guarded["choices"][0]["srp"]
    assert srp["reflections"], srp  # the guard read a reflection (tiny budget: after 8 tokens)
    assert set(srp["reflections"][0]) >= {"safe", "category", "label"}
    beam = _complete(server, "ROMEO:", max_tokens=6, decoding="safebeam", num_beams=2)
    assert beam["choices"][0]["srp"]["finish"] in ("eod", "length", "tag")


BAD = [  # (body, status, the field the error names)
    (b"{not json", 400, None),
    ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "M", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "M", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "M", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "M", "prompt": "word " * 1100, "max_tokens": 8}, 400, "prompt"),
    ({"model": "M", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "M", "prompt": "x", "n": "two"}, 400, "n"),
    ({"model": "M", "prompt": 42}, 400, "prompt"),
    ({"model": "M", "prompt": "x", "decoding": "telepathy"}, 400, "decoding"),
    ({"model": "M", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "M", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[str(b[2]) + str(i)
                                                        for i, b in enumerate(BAD)])
def test_a_bad_request_is_named_and_the_next_one_is_served(server, body, status, param):
    good = _complete(server, "KING", max_tokens=4, temperature=0)["choices"][0]["text"]
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": server.name}
    r = _post(server, "/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert _complete(server, "KING", max_tokens=4, temperature=0)["choices"][0]["text"] == good


def test_bad_chat_requests_name_the_field(server):
    for messages, param in (([], "messages"), ([{"role": "bot", "content": "hi"}],
                                               "messages.0.role"),
                            ([{"role": "system", "content": "be brief"}], "messages")):
        r = _post(server, "/chat/completions", {"model": server.name, "messages": messages})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_full_queue_answers_429_with_retry_after(tiny_long_context, tmp_path):
    with ServerProcess(tiny_long_context, ["--max-batch", "1", "--max-queue", "1",
                                         "--batch-wait-ms", "0"],
                       log_path=tmp_path / "log") as srv:
        body = {"model": model_name(tiny_long_context), "prompt": "ROMEO:", "max_tokens": 100,
                "temperature": 0}
        with cf.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: httpx.post(srv.base_url + "/completions",
                                                         json=body, timeout=120), range(8)))
        codes = sorted(r.status_code for r in replies)
        assert set(codes) == {200, 429} and codes.count(200) >= 1, codes
        busy = [r for r in replies if r.status_code == 429]
        assert all(int(r.headers["Retry-After"]) >= 1 for r in busy)
        assert busy[0].json()["error"]["code"] == "queue_full"
        texts = {r.json()["choices"][0]["text"] for r in replies if r.status_code == 200}
        assert len(texts) == 1  # every answered request got the full, same answer
        assert srv.health()["rejected"] == len(busy)


def test_the_openai_client_talks_to_the_server(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [server.name]
    done = client.completions.create(model=server.name, prompt="ROMEO:", max_tokens=8,
                                     temperature=0)
    assert done.choices[0].text == _complete(server, "ROMEO:", max_tokens=8,
                                             temperature=0)["choices"][0]["text"]
    chat = client.chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "Who is Romeo?"}],
        max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "Who is Romeo?"}],
        max_tokens=8, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    guarded = client.completions.create(model=server.name, prompt="ROMEO:", max_tokens=8,
                                        temperature=0, extra_body={"decoding": "guarded"})
    assert guarded.choices[0].model_extra["srp"]["reflections"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=server.name, prompt="x", max_tokens=0)
