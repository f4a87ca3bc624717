"""Reflection-guarded decoding alone and in a batch, run in a process of its own (Megatron's
global parallel state makes reusing pytest's fragile).

Usage: python tests/_guarded_batch_child.py OUT.json. Writes the results of each scenario's
prompts decoded one at a time and together; tests/test_guarded_batch.py asserts on them.

The model is a real, freshly initialised Megatron GPTModel (tiny preset, a 128-token window);
``RuleModel`` (tests/_inference_child.py) forces its habits where a scenario needs a known
verdict. A long prompt (100 tokens) shares the batch with short ones: left-padded to 100, a
short prompt's 40-token answer and its reflection used to run past the shared window.
"""
from __future__ import annotations

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from _inference_child import BIG, RuleModel, tiny_model  # noqa: E402

from megatron_srp.inference.generation import decode_ids  # noqa: E402
from megatron_srp.inference.guarded import GuardConfig, _Ids, guard_summary  # noqa: E402
from megatron_srp.inference.sample import GenerationConfig, shutdown  # noqa: E402
from megatron_srp.tokenizer import SRPTokenizer  # noqa: E402


def rules(tok: SRPTokenizer) -> dict:
    """Forced habits: text is ' word'; a reflection says Safe, Unsafe past a position, or
    nothing readable; or the model opens reflection after reflection and never answers."""
    ids = _Ids(tok)
    safe = tok.tokenize("<|reflect|>Safe<|/reflect|>")[1:]
    unsafe = tok.tokenize("<|reflect|>Unsafe<|/reflect|>")[1:]
    word = tok.tokenize(" word")[0]
    nxt = dict(zip(safe[:-1], safe[1:]))
    nxt.update(zip(unsafe[:-1], unsafe[1:]))

    def verdict(threshold: int):
        def rule(t, p):
            if t == ids.open:
                return {(unsafe if p >= threshold else safe)[0]: BIG}
            return {nxt.get(t, word): BIG}
        return rule

    def reflect_forever(t, p):
        if t == ids.open:
            return {safe[0]: BIG}
        return {nxt[t]: BIG} if t in nxt else {ids.open: BIG}

    return {"safe": verdict(10_000), "unsafe_late": verdict(60),
            "malformed": lambda t, p: {word: BIG}, "reflect_forever": reflect_forever}


def run(model, tok, prompts: list[list[int]], cfg: GuardConfig) -> dict:
    alone = [decode_ids(model, tok, [p], cfg)[0].to_dict() for p in prompts]
    together = [r.to_dict() for r in decode_ids(model, tok, prompts, cfg)]
    reversed_ = [r.to_dict() for r in decode_ids(model, tok, prompts[::-1], cfg)][::-1]
    return {"alone": alone, "batch": together, "batch_reversed": reversed_,
            "summary": guard_summary(decode_ids(model, tok, prompts, cfg))}


def main(path: str) -> None:
    model, tok = tiny_model()
    g = torch.Generator().manual_seed(1)
    long = torch.randint(10, 8000, (100,), generator=g).tolist()
    short = tok.tokenize("Tell me")
    middle = torch.randint(10, 8000, (60,), generator=g).tolist()
    prompts = [short, long, middle]
    guard = GuardConfig(sampling=GenerationConfig(max_new_tokens=40, temperature=0.0),
                        segment_tokens=256)
    out = {"window": int(model.max_sequence_length), "lengths": [len(p) for p in prompts],
           "reflection_budget": guard.resolved(tok).reflection_budget(),
           "label_tokens": guard.resolved(tok).max_label_tokens}
    for name, rule in rules(tok).items():
        out[name] = run(RuleModel(model, rule), tok, prompts, guard)
    out["fail_open"] = run(RuleModel(model, rules(tok)["malformed"]), tok, prompts,
                           GuardConfig(sampling=guard.sampling, fail_open=True))
    out["plain_model"] = run(model, tok, prompts, guard)
    # A label longer than 12 tokens: MedSafetyWorld's "Unsafe: MSW-PRIVACY" is 15.
    from megatron_srp.inference.guarded import read_reflections
    from megatron_srp.medsafetyworld.world import TAXONOMY
    from megatron_srp.taxonomy import format_reflection

    chain = tok.tokenize(format_reflection(False, "MSW-PRIVACY", taxonomy=TAXONOMY))[1:]
    nxt = dict(zip(chain[:-1], chain[1:]))
    word = tok.tokenize(" word")[0]
    opener = _Ids(tok).open
    privacy = RuleModel(model, lambda t, p: {chain[0]: BIG} if t == opener
                        else {nxt.get(t, word): BIG})
    out["long_label"] = run(privacy, tok, prompts, GuardConfig(sampling=guard.sampling,
                                                                taxonomy=TAXONOMY))
    out["long_label_cut"] = run(privacy, tok, prompts[:1], GuardConfig(
        sampling=guard.sampling, taxonomy=TAXONOMY, max_label_tokens=12))
    out["long_label_tokens"] = len(chain) - 1
    out["long_label_read"] = [r.to_dict() for r in read_reflections(
        privacy, tok, [short, middle], taxonomy=TAXONOMY)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
