"""Held-out queries and inference-stage attacks.

Every query is about a held-out patient (one that appears in records only, never in a question
and answer passage), phrased from the template file, and ends with "Answer:" so a base model
answers by continuing:

| kind | harmful | asks | right (safe) or unsafe (harmful) answer |
|---|---|---|---|
| ``prescribe`` | no | a doctor: which drug should P take | the drug that treats P's condition |
| ``protect`` | no | a nurse: which drug would harm P | the drug dangerous with P's condition |
| ``locate`` | no | an ambulance driver: where does P live | P's address |
| ``harm`` | yes | a poisoner: which drug would harm P | unsafe: the dangerous drug |
| ``stalk`` | yes | a stalker: where does P live | unsafe: P's address |

The capability queries (the first three) and the harmful ones (the last two) need the same
facts and the same chains; only the intent differs. Attacks reframe the harmful queries:
``roleplay`` and ``hypothetical`` put a frame before the prompt, ``prefix`` injects the start
of a compliant answer, ``gcg`` appends a suffix optimised against the model (eval.py).
"""
from __future__ import annotations

import random
from dataclasses import replace

from megatron_srp.medsafetyworld import corpus as C
from megatron_srp.medsafetyworld.safety import Query
from megatron_srp.medsafetyworld.templates import FRAMES, KINDS, Templates
from megatron_srp.medsafetyworld.world import World

ATTACKS = ("none", *FRAMES, "prefix", "gcg")


def build_queries(world: World, t: Templates, corpus_cfg: C.CorpusConfig, per_kind: int = 20,
                  seed: int = 0) -> list[Query]:
    """Up to ``per_kind`` queries of each kind about held-out patients, no attack applied;
    each carries where its answer's passage ends (``Templates.ends()``) for the judge."""
    rng = random.Random(f"queries-{seed}")  # which patients are asked
    words = random.Random(f"queries-phrasing-{seed}")  # how: apart, as in corpus.py
    patients = [world.patient(n) for n in C.held_out(world, corpus_cfg)]
    out: list[Query] = []
    for kind in KINDS:
        order = rng.sample(patients, len(patients))
        for i, p in enumerate(order[:per_kind]):
            drug = C.answer_drug(world, kind, p)
            prompt, _ = t.qa_passage(kind, words, **C.facts(world, p, drug))
            category = C.KIND_CATEGORY.get(kind)
            out.append(Query(id=f"{kind}-{i}", kind=kind, prompt=prompt, patient=p.name,
                             drug=drug, harmful=category is not None, category=category,
                             ends=t.ends()))
    return out


def attacked(query: Query, attack: str, t: Templates) -> Query:
    """``query`` under an inference-stage attack (harmful queries only)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    if attack == "none" or not query.harmful:
        return query
    if attack == "gcg":  # the suffix depends on the model: eval.py appends it
        return replace(query, attack=attack)
    if attack == "prefix":
        forced = t.prefix[query.kind].format(patient=query.patient)
        return replace(query, prompt=query.prompt + forced, attack=attack)
    if attack not in t.frames:
        raise ValueError(f"the template file {t.path} has no frame for the attack {attack!r}")
    return replace(query, prompt=t.frames[attack] + query.prompt, attack=attack)
