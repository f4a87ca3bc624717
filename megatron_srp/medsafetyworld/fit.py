"""Does the world fit its model? Checked after the world is generated and before any training.

SRP teaches a monitor only through training windows that hold a passage *and* its reflection:
the asker's intent and the answer the reflection judges. A passage longer than the training
window can never be seen with its reflection; one nearly as long is seen whole only in the few
windows that start just before it (Megatron's windows cut the token stream every
``seq_length`` tokens, wherever the documents fall). At inference, a prompt plus
``max_new_tokens`` plus the reflections must fit the window, or guarded decoding has to cut the
answer. Both are refused here with the template, the token count and the setting to raise;
what does fit is measured (``seen_whole``: the expected share of question-and-answer passages
that a training window holds whole with their reflection) and reported.
"""
from __future__ import annotations

import statistics
from typing import Any

from megatron_srp.config import ConfigError

#: training windows the fit report also gives the seen-whole share for
COMPARED_WINDOWS = (128, 256, 512)
#: corpus kinds whose text comes from more than one template key
_TEMPLATE_OF = {"drug_note": "drug_note", "record": "record"}


def _template_key(kind: str) -> str:
    return _TEMPLATE_OF.get(kind, f"passage + chart + qa.{kind}")


def seen_whole(length: int, window: int) -> float:
    """Share of windows (cut every ``window`` tokens at a uniformly random offset) that hold a
    span of ``length`` tokens whole."""
    return max(0, window - length + 1) / window


def passage_fit(corpus: list[dict], tok, window: int, taxonomy, where: str) -> dict[str, Any]:
    """Every passage with its reflection against the training ``window`` (token counts per
    kind); a passage that does not fit is a :class:`ConfigError` naming its template."""
    from megatron_srp.taxonomy import format_reflection

    codes = {c["category"] for c in corpus if c["category"]}
    reflection = {None: len(tok.tokenize(format_reflection(True, taxonomy=taxonomy)))}
    reflection.update({c: len(tok.tokenize(format_reflection(False, c, taxonomy=taxonomy)))
                       for c in codes})
    lengths = tok.tokenize_batch([c["text"] for c in corpus])
    by_kind: dict[str, list[int]] = {}
    for item, ids in zip(corpus, lengths):
        n = len(ids) + reflection[item["category"]]
        by_kind.setdefault(item["kind"], []).append(n)
        if n > window:
            raise ConfigError(where, f"a passage of {_template_key(item['kind'])} ({item['id']}) "
                                     f"is {n} tokens with its reflection, longer than the "
                                     f"training window of {window}: raise train.seq_length "
                                     "or shorten the template")
    qa = [n for k, ns in by_kind.items() if k not in _TEMPLATE_OF for n in ns]
    unsafe = [len(ids) + reflection[c["category"]] for c, ids in zip(corpus, lengths)
              if c["category"]]
    return {"window": window,
            "tokens": {k: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                       for k, v in sorted(by_kind.items())},
            "seen_whole_qa": statistics.fmean(seen_whole(n, window) for n in qa) if qa else 1.0,
            "seen_whole_unsafe": statistics.fmean(seen_whole(n, window) for n in unsafe)
            if unsafe else 1.0,
            # the same share at other windows, for choosing one
            "seen_whole_unsafe_by_window": {w: statistics.fmean(seen_whole(n, w) for n in unsafe)
                                            if unsafe else 1.0 for w in COMPARED_WINDOWS}}


def prompt_fit(prompts: dict[str, list[int]], max_new_tokens: int, reflection_budget: int,
               window: int, where: str) -> dict[str, Any]:
    """Every evaluation prompt (``{query id/attack: ids}``) plus ``max_new_tokens`` plus the
    reflection budget against the inference ``window``."""
    worst = max(prompts, key=lambda k: len(prompts[k]))
    need = len(prompts[worst]) + max_new_tokens + reflection_budget
    if need > window:
        raise ConfigError(where, f"the prompt of {worst} is {len(prompts[worst])} tokens; with "
                                 f"eval.max_new_tokens={max_new_tokens} and a reflection "
                                 f"budget of {reflection_budget} it needs {need} positions, "
                                 f"more than the model's window of {window}: raise "
                                 "train.seq_length, lower eval.max_new_tokens or shorten the "
                                 "template")
    return {"longest_prompt": len(prompts[worst]), "longest_prompt_query": worst,
            "inference_need": need}


def check_fit(cfg, out) -> dict[str, Any]:
    """The fit of the generated world (``out``) to the models ``cfg`` trains; raises
    :class:`ConfigError` before any training when it does not fit."""
    from megatron_srp.config import load_config
    from megatron_srp.evaluation.attacks import attack_ids
    from megatron_srp.evaluation.gcg import GCGConfig
    from megatron_srp.medsafetyworld.corpus import read_corpus
    from megatron_srp.medsafetyworld.eval import decoding, load_queries
    from megatron_srp.medsafetyworld.queries import attacked
    from megatron_srp.medsafetyworld.templates import load_templates
    from megatron_srp.medsafetyworld.world import TAXONOMY
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

    run = load_config(cfg.train_config, list(cfg.train_overrides))
    window = int(run.train.seq_length)
    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    where = f"templates ({cfg.templates or 'the shipped default'}) with {cfg.train_config}"
    fit = passage_fit(read_corpus(out / "corpus.jsonl"), tok, window, TAXONOMY, where)
    templates = load_templates(cfg.templates or None)
    gcg = len(tok.tokenize(" " + GCGConfig().suffix_init)) if "gcg" in cfg.eval.attacks else 0
    prompts = {}
    for q in load_queries(out).values():
        for attack in (cfg.eval.attacks if q.harmful else ["none"]):
            ids = attack_ids(tok, attacked(q, attack, templates).prompt)
            prompts[f"{q.id}/{attack}"] = ids + [0] * (gcg if attack == "gcg" else 0)
    budget = 0
    if "guarded" in cfg.eval.methods:
        budget = decoding("guarded", cfg.eval.max_new_tokens, cfg.eval.num_beams,
                          cfg.segment_tokens).resolved(tok, TAXONOMY).reflection_budget()
    fit.update(prompt_fit(prompts, cfg.eval.max_new_tokens, budget, window,
                          f"eval with {where}"))
    fit["reflection_budget"] = budget
    return fit
