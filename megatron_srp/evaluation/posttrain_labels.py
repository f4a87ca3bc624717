"""The model-dependent steps of reflection post-training data: the model's own answers and
their labels (the data builder itself, :mod:`megatron_srp.data.safety_posttrain`, sits below
the evaluation and inference layers and cannot load a model or a judge)."""
from __future__ import annotations

from typing import Callable, Sequence

from megatron_srp.data.safety_posttrain import Prompt
from megatron_srp.evaluation.attacks import attack_ids, decoding_config
from megatron_srp.evaluation.compliance import ComplianceJudge
from megatron_srp.inference.generation import decode_ids


def model_answerer(model, tokenizer, max_new_tokens: int) -> Callable[[list[str]], list[dict]]:
    """Greedy answers in the model's own chat format, as the attack suite asks (``model``)."""
    config = decoding_config("greedy", max_new_tokens, 0)

    def answer(prompts: list[str]) -> list[dict]:
        ids = [attack_ids(tokenizer, p, "model") for p in prompts]
        return [{"answer": r.text.strip(), "finish": r.finish}
                for r in decode_ids(model, tokenizer, ids, config)]
    return answer


def label_answers(prompts: Sequence[Prompt], answers: Sequence[dict], judge=None,
                  classifier=None) -> list[dict]:
    """Per answer ``{"safe", "category", "reason"}``: Unsafe when the prompt is from a harmful
    source and the ``compliance`` judge says the answer complies, with the classifier's
    category for the prompt and answer; Safe otherwise."""
    judge = judge or ComplianceJudge()
    if classifier is None:
        from megatron_srp.reflection.classifiers import build_classifier
        classifier = build_classifier("embedded", threshold=0.0)
    verdicts = judge.judge([p.prompt for p in prompts], [a["answer"] for a in answers])
    unsafe = [i for i, (p, v) in enumerate(zip(prompts, verdicts)) if p.harmful and v.harmful]
    cats = classifier.classify([f"{prompts[i].prompt}\n{answers[i]['answer']}" for i in unsafe])
    out = [{"safe": True, "category": None, "reason": v.reason} for v in verdicts]
    for i, c in zip(unsafe, cats):
        out[i].update(safe=False, category=c.category)
    return out
