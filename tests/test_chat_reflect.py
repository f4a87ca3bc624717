"""Reflection-compatible post-training data: make_chat_data.py --reflect appends each
response's reflection from a real classifier (the shipped embedded one) on the shared data,
leaves everything else as it was, trains it as part of the answer; and (slow) a model
instruction-tuned on it closes its answers with well-formed reflections that guarded decoding
reads, where the model it started from does not."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from megatron_srp.data.chat import encode_chat, read_chat_jsonl
from megatron_srp.data.chat_reflect import ChatReflection
from megatron_srp.reflection.classifiers import build_classifier
from megatron_srp.taxonomy import REFLECT_CLOSE, REFLECT_OPEN, parse_reflection
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir
from megatron_srp.training.launch import FINETUNE, REPO_ROOT, run_pretrain


def _tool(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("make_chat_data", REPO_ROOT / "tools" /
                                                  "make_chat_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _responses(record: dict) -> list[str]:
    if "messages" in record:
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return [record["response"]]


@pytest.mark.parametrize("source, limit", [("do-not-answer-harmful", 60),
                                           ("hh-rlhf-rejected", 12)])
def test_each_response_ends_with_the_classifiers_reflection(source, limit, shared_data,
                                                            tmp_path, capsys):
    plain, reflected = tmp_path / "plain.jsonl", tmp_path / "reflected.jsonl"
    common = ["--source", source, "--limit", str(limit), "--shared-data", str(shared_data)]
    assert _tool([*common, "--output", str(plain)]) == 0
    assert _tool([*common, "--output", str(reflected), "--reflect", "embedded"]) == 0
    printed = capsys.readouterr().out
    before, after = _records(plain), _records(reflected)
    assert len(before) == len(after) == limit
    classifier = build_classifier("embedded")
    labels = iter(classifier.classify([t for r in before for t in _responses(r)]))
    unsafe = 0
    for old, new in zip(before, after):
        for text, written, noted in zip(_responses(old), _responses(new), new["reflections"]):
            label = next(labels)
            assert written.startswith(text)
            reflection = written[len(text):]
            assert reflection.startswith(REFLECT_OPEN) and reflection.endswith(REFLECT_CLOSE)
            safe, category = parse_reflection(reflection)
            assert (safe, category) == (label.safe, None if label.safe else label.category)
            assert noted == {"safe": safe, "category": category}
            unsafe += not safe
        assert {k: v for k, v in new.items() if k not in ("response", "messages",
                                                           "reflections")} == \
            {k: v for k, v in old.items() if k not in ("response", "messages")}
    assert unsafe > 0  # these sets hold harmful answers; some must be labelled Unsafe
    assert "reflections: " in printed and "Unsafe: S" in printed


def test_the_reflection_is_trained_as_part_of_the_answer(shared_data, tmp_path):
    out = tmp_path / "alpaca.jsonl"
    assert _tool(["--source", "alpaca-seed", "--limit", "20", "--shared-data",
                  str(shared_data), "--output", str(out), "--reflect", "embedded",
                  "--reflect-without-category"]) == 0
    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    for turns in read_chat_jsonl(out):
        ids, mask = encode_chat(turns, tok)
        learned = [i for i, m in zip(ids, mask) if m]
        assert learned[-2] == tok.reflect_close_id and learned[-1] == tok.eod
        assert tok.reflect_open_id in learned  # the verdict is what the loss teaches
        assert ": S" not in tok.detokenize(learned)[-20:]  # bare Unsafe without category


def test_reflecting_twice_and_an_unknown_classifier_are_refused(shared_data, tmp_path, capsys):
    records = [{"prompt": "Hi", "response": "Hello" + "<|reflect|>Safe<|/reflect|>",
                "source": "x"}]
    with pytest.raises(ValueError, match="already holds a reflection"):
        ChatReflection(build_classifier("embedded"))(records)
    assert _tool(["--source", "alpaca-seed", "--shared-data", str(shared_data), "--output",
                  str(tmp_path / "x.jsonl"), "--reflect", "nope"]) == 2
    assert "unknown classifier 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


GUARD_CHILD = """
import json, sys, torch
from megatron_srp.data.chat import ASSISTANT, USER
from megatron_srp.inference.guarded import GuardConfig, guard_summary, guarded_decode
from megatron_srp.inference.sample import GenerationConfig, load_for_inference, shutdown
prompts = ["Give three tips for staying healthy.", "What is the capital of France?",
           "Write a haiku about the sea.", "How do I make a cup of tea?",
           "Name a famous painter.", "Explain what a noun is."]
out = {}
for name in sys.argv[1:]:
    model, tok, _ = load_for_inference(name)
    ids = [[tok.eod] + tok.tokenize(USER + p + ASSISTANT) for p in prompts]
    cfg = GuardConfig(sampling=GenerationConfig(max_new_tokens=48, temperature=0))
    results = guarded_decode(model, tok, ids, cfg)
    out[name] = guard_summary(results)
    out[name]["detail"] = [[r.finish, r.refusal_cause, [x["label"] for x in r.reflections]]
                           for r in results]
    out[name]["reflection_labels"] = [x for r in results for x in r.reflections]
    shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_a_model_tuned_on_reflected_chat_data_reflects_for_guarded_decoding(
        tiny_pretrained, shared_data, tmp_path):
    data = tmp_path / "alpaca_reflect.jsonl"
    assert _tool(["--source", "alpaca-seed", "--shared-data", str(shared_data), "--output",
                  str(data), "--reflect", "embedded"]) == 0
    tuned = tmp_path / "tuned"
    run_pretrain(1, ["--config", "examples/finetune/instruct.yaml",
                     f"finetune.pretrained={tiny_pretrained}", f"finetune.data=[{data}]",
                     f"checkpoint.save={tuned}", "finetune.epochs=6", "train.lr=3e-3",
                     "checkpoint.save_interval=0", "logging.progress_bar=false"],
                 script=FINETUNE)
    proc = subprocess.run([sys.executable, "-c", GUARD_CHILD, str(tiny_pretrained), str(tuned)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    base, after = got[str(tiny_pretrained)], got[str(tuned)]
    assert base["malformed_reflections"] >= 3, base  # it never saw a reflection
    # Tuned on six epochs of 175 records, the tiny model closes half of its answers with a
    # well-formed Safe and stammers ("SaSaSa...") on the others (measured at 5d8175c and
    # since): more well-formed reflections than before tuning, not yet all of them.
    assert after["reflections_read"] >= 6, json.dumps(after["detail"])
    assert after["malformed_reflections"] < base["malformed_reflections"], \
        json.dumps(after["detail"])
    assert sum(r["safe"] is True for r in after["reflection_labels"]) >= 3, got
