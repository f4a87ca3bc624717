"""Log-probabilities from tools/serve_srp.py (a real subprocess serving the session's tiny
model, conftest.py's ``served_tiny``) against the same model computed offline, and lm-eval's
log-likelihood tasks through the server against lm-eval's ``hf`` backend on the float32 export
of the same checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "lm_eval_tasks"
TOL = 1e-4  # float32, batched (served) against one prompt at a time (offline)


def _post(srv, path: str, body: dict) -> dict:
    r = httpx.post(srv.base_url + path, json={"model": srv.name, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def offline(served_tiny):
    """The served checkpoint loaded here: ``logp(ids)`` is log_softmax of its logits."""
    from megatron_srp.inference.sample import _logits, load_for_inference, shutdown

    model, tokenizer, _ = load_for_inference(served_tiny.checkpoint_dir)
    model.eval()

    def logp(ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(_logits(model, torch.tensor([ids]), tokenizer.vocab_size)[0],
                                 dim=-1)

    yield tokenizer, logp
    shutdown()


def test_echo_returns_the_prompts_logprobs_as_computed_offline(served_tiny, offline):
    tokenizer, logp = offline
    texts = ["ROMEO:\nWhat light through yonder window breaks?", "KING", "First Citizen:\n"
             "Before we proceed any further, hear me speak."]
    worst = 0.0
    for text in texts:
        ids = tokenizer.tokenize(text)
        ref = logp(ids)
        for prompt in (text, ids):  # text, and token ids (what lm-eval sends)
            body = _post(served_tiny, "/completions", {"prompt": prompt, "echo": True,
                                                       "logprobs": 3, "max_tokens": 0})
            choice = body["choices"][0]
            lp = choice["logprobs"]
            assert choice["text"] == tokenizer.detokenize(ids)
            assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                     "total_tokens": len(ids)}
            assert lp["tokens"] == [tokenizer.detokenize([i]) for i in ids]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert lp["text_offset"][0] == 0
            want = [float(ref[j, ids[j + 1]]) for j in range(len(ids) - 1)]
            got = lp["token_logprobs"][1:]
            assert len(got) == len(want)  # "KING" is one token: only its null entry
            worst = max([worst, *(abs(a - b) for a, b in zip(got, want))])
            for j, top in enumerate(lp["top_logprobs"][1:]):
                values, best = torch.topk(ref[j], 3)
                assert len(top) == 3
                assert list(top) == [tokenizer.detokenize([i]) for i in best.tolist()]
                assert max(abs(a - b) for a, b in zip(top.values(), values.tolist())) < TOL
    assert worst < TOL, worst
    print(f"\nmax |served - offline| prompt log-probability: {worst:.2e}")


def test_echo_with_one_token_appends_the_answers_logprob(served_tiny, offline):
    """lm-eval's request (``echo``, ``logprobs: 1``, ``max_tokens: 1``): the prompt's entries,
    then exactly one for the token drawn (the end-of-document token included, if drawn)."""
    tokenizer, logp = offline
    for text in ("ROMEO:", "KING RICHARD III:\nNow is the winter of our discontent"):
        ids = tokenizer.tokenize(text)
        ref = logp(ids)
        lp = _post(served_tiny, "/completions", {"prompt": ids, "echo": True, "logprobs": 1,
                                                 "max_tokens": 1, "temperature": 0}
                   )["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1
        best = int(torch.argmax(ref[-1]))
        assert lp["tokens"][-1] == tokenizer.detokenize([best])
        assert abs(lp["token_logprobs"][-1] - float(ref[-1, best])) < TOL
        assert lp["top_logprobs"][-1] == {lp["tokens"][-1]: lp["token_logprobs"][-1]}
    with httpx.Client() as http:  # max_tokens 0 only with echo; echo not with stream
        for body, param in (({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                            ({"prompt": "x", "echo": True, "stream": True}, "echo")):
            r = http.post(served_tiny.base_url + "/completions", timeout=60,
                          json={"model": served_tiny.name, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_chat_logprobs_in_the_chat_format_equal_offline(served_tiny, offline):
    from megatron_srp.serving.app import chat_prompt_ids

    tokenizer, logp = offline
    messages = [{"role": "user", "content": "Who is Romeo?"}]
    body = _post(served_tiny, "/chat/completions", {"messages": messages, "max_tokens": 6,
                                                    "temperature": 0, "logprobs": True,
                                                    "top_logprobs": 2})
    content = body["choices"][0]["logprobs"]["content"]
    ids = chat_prompt_ids(tokenizer, [(m["role"], m["content"]) for m in messages])
    worst = 0.0
    for entry in content:  # greedy, one full forward pass per token (no cache)
        ref = logp(ids)[-1]
        best = int(torch.argmax(ref))
        assert entry["token"] == tokenizer.detokenize([best])
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"] or \
            "\ufffd" in entry["token"]
        worst = max(worst, abs(entry["logprob"] - float(ref[best])))
        assert [t["token"] for t in entry["top_logprobs"]] == [
            tokenizer.detokenize([i]) for i in torch.topk(ref, 2).indices.tolist()]
        ids = ids + [best]
    assert len(content) == body["usage"]["completion_tokens"] or \
        len(content) == body["usage"]["completion_tokens"] + 1  # + the end-of-document token
    assert worst < TOL, worst
    no = _post(served_tiny, "/chat/completions", {"messages": messages, "max_tokens": 2})
    assert no["choices"][0]["logprobs"] is None
    r = httpx.post(served_tiny.base_url + "/chat/completions", timeout=60, json={
        "model": served_tiny.name, "messages": messages, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


# ------------------------------------------------------------------------------ lm-eval
def _task_data(shared: Path, out: Path) -> None:
    """The two local tasks' data, from the shared data: 12 XSTest requests (6 safe, 6 unsafe)
    and 6 WikiText-2 test paragraphs of 100-400 characters."""
    rows = [json.loads(line) for line in
            (shared / "xstest" / "xstest_prompts.jsonl").read_text().splitlines()]
    picked = [r for r in rows if r["label"] == "safe"][:6] + \
        [r for r in rows if r["label"] == "unsafe"][:6]
    (out / "srp_xstest_mc.jsonl").write_text("".join(
        json.dumps({"text": r["text"], "label": int(r["label"] == "unsafe")}) + "\n"
        for r in picked))
    lines = [ln.strip() for ln in (shared / "wikitext2" / "test.txt").read_text(
        encoding="utf-8").splitlines()]
    paragraphs = [ln for ln in lines if 100 <= len(ln) <= 400 and not ln.startswith("=")][:6]
    (out / "srp_wikitext_lines.jsonl").write_text("".join(
        json.dumps({"text": p}) + "\n" for p in paragraphs))


def _lm_eval(tmp: Path, name: str, model: str, model_args: str) -> dict:
    out = tmp / name
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
           "--tasks", "srp_xstest_mc,srp_wikitext_lines", "--include_path", str(TASKS),
           "--output_path", str(out), "--log_samples", "--device", "cpu"]
    env = {"PATH": "/usr/bin:/bin", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp / "hf"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [result] = list(out.rglob("results_*.json"))
    figures = json.loads(result.read_text())["results"]
    per_doc = {}
    for task in ("srp_xstest_mc", "srp_wikitext_lines"):
        [samples] = list(out.rglob(f"samples_{task}_*.jsonl"))
        for line in samples.read_text().splitlines():
            s = json.loads(line)
            per_doc[(task, s["doc_id"])] = s["filtered_resps"]
    return {"results": figures, "per_doc": per_doc}


def _floats(x) -> list[float]:
    """The log-likelihoods in a sample's responses (lm-eval writes them as strings, beside
    ``is_greedy`` flags, which are left out)."""
    if isinstance(x, bool) or x in ("True", "False"):
        return []
    if isinstance(x, (int, float, str)):
        return [float(x)]
    return [f for item in x for f in _floats(item)]


@pytest.mark.slow
def test_lm_eval_loglikelihood_tasks_served_equal_the_hf_backend(served_tiny, shared_data,
                                                                 tmp_path):
    pytest.importorskip("lm_eval")
    export = tmp_path / "export"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), "--checkpoint",
                           str(served_tiny.checkpoint_dir), "--out", str(export), "--dtype",
                           "float32", "--no-progress"], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    _task_data(shared_data, tmp_path)
    jobs = served_tiny.health()["jobs"]
    served = _lm_eval(tmp_path, "served", "local-completions",
                      f"model={served_tiny.name},base_url={served_tiny.base_url}/completions,"
                      f"tokenizer={export},tokenizer_backend=huggingface,"
                      "tokenized_requests=True,num_concurrent=4,max_retries=1,max_length=1024")
    assert served_tiny.health()["jobs"] > jobs  # it was the server that answered
    hf = _lm_eval(tmp_path, "hf", "hf", f"pretrained={export},dtype=float32,max_length=1024")
    assert served["per_doc"].keys() == hf["per_doc"].keys()
    assert len(served["per_doc"]) == 12 + 6
    worst = 0.0
    for key, resps in served["per_doc"].items():
        a, b = _floats(resps), _floats(hf["per_doc"][key])
        assert len(a) == len(b) > 0
        worst = max(worst, max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b)))
    assert worst < 1e-4, worst
    s, h = served["results"], hf["results"]
    assert s["srp_xstest_mc"]["acc,none"] == h["srp_xstest_mc"]["acc,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert s["srp_wikitext_lines"][metric] == pytest.approx(
            h["srp_wikitext_lines"][metric], rel=1e-4)
    print(f"\nlm-eval served vs hf: largest relative difference of a log-likelihood {worst:.2e};"
          f" acc {s['srp_xstest_mc']['acc,none']:.3f} / {h['srp_xstest_mc']['acc,none']:.3f};"
          f" word_perplexity {s['srp_wikitext_lines']['word_perplexity,none']:.4f} / "
          f"{h['srp_wikitext_lines']['word_perplexity,none']:.4f}")
