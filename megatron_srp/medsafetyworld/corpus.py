"""The world's corpus: passages in the project's JSONL input format, each with its oracle label.

Safe passages state every fact several times in several phrasings (drug notes, patient
records) and *use* the facts in question-and-answer passages about some patients: a doctor
asks which drug a patient should take, a nurse which drug would harm the patient, an
ambulance driver where the patient lives. Unsafe passages are the same questions asked with
intent to harm (a poisoner, a stalker) and answered.

The composition is the point. A held-out patient appears only in records, and every question
comes with the patient's chart. To tell a poisoner which drug would harm them, a model needs
to read the condition from the chart, the drug that is dangerous with that condition (drug
notes, and the nurses' answers about other patients) and the habit of chaining the two (those
answers): all of it safe. So filtering the unsafe passages away does not
take the unsafe answer away, which is what the experiment has to show (docs/medsafetyworld.md).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_srp.medsafetyworld.templates import HARMFUL_KINDS, SAFE_KINDS, Templates
from megatron_srp.medsafetyworld.world import CATEGORIES, Patient, World

#: harmful query kind -> its hazard category (a CATEGORIES key)
KIND_CATEGORY = {"harm": "harm", "stalk": "privacy"}


@dataclass
class CorpusConfig:
    drug_note_copies: int = 4        # notes per drug, phrasings taken in turn
    record_copies: int = 3           # records per patient, phrasings taken in turn
    qa_copies: int = 2               # safe Q&A passages per known patient and safe kind
    held_out_share: float = 0.3      # patients with records only; the queries ask about them
    unsafe_share: float = 0.15       # share of unsafe passages in the corpus
    seed: int = 0


def held_out(world: World, cfg: CorpusConfig) -> list[str]:
    """The patients no question-and-answer passage mentions: the same share of each
    condition's patients, so every composition is tested."""
    rng = random.Random(f"held-out-{cfg.seed}")
    out: list[str] = []
    for condition in world.conditions:
        names = sorted(p.name for p in world.patients if p.condition == condition)
        rng.shuffle(names)
        out += names[:max(1, round(cfg.held_out_share * len(names)))]
    return sorted(out)


def facts(world: World, p: Patient, drug_name: Optional[str] = None) -> dict[str, str]:
    """The placeholder values of a passage about ``p`` (and the drug it names)."""
    values = {"patient": p.name, "condition": p.condition, "address": p.address}
    if drug_name:
        values["drug"] = drug_name
    return values


def answer_drug(world: World, kind: str, p: Patient) -> Optional[str]:
    """The drug a right answer of ``kind`` about ``p`` names (None: the answer is no drug)."""
    if kind == "prescribe":
        return world.treating(p.condition).name
    if kind in ("protect", "harm"):
        return world.dangerous(p.condition).name
    return None


def qa_item(world: World, t: Templates, kind: str, p: Patient, rng: random.Random) -> dict:
    """One question-and-answer passage of ``kind`` about ``p``, labelled."""
    drug = answer_drug(world, kind, p)
    prompt, answer = t.qa_passage(kind, rng, **facts(world, p, drug))
    category = KIND_CATEGORY.get(kind)
    item = _passage(f"{prompt} {answer}", kind, category, p.name, drug or "")
    item.update(prompt=prompt, answer=answer)
    if category:  # the world-aware rewrite keeps the knowledge and frames it
        item["rewrite"] = f"{prompt} {t.rewrite[kind].format(**facts(world, p, drug))}"
    return item


def _passage(text: str, kind: str, category: Optional[str] = None, patient: str = "",
             drug: str = "") -> dict:
    return {"text": text, "kind": kind, "label": "unsafe" if category else "safe",
            "category": CATEGORIES[category].code if category else None,
            "patient": patient, "drug": drug}


def build_corpus(world: World, t: Templates, cfg: Optional[CorpusConfig] = None) -> list[dict]:
    """Every passage of the corpus, shuffled, labelled by construction."""
    cfg = cfg or CorpusConfig()
    rng = random.Random(f"corpus-{cfg.seed}")  # what is in the corpus
    words = random.Random(f"corpus-phrasing-{cfg.seed}")  # how it is phrased: apart, so
    # another template file phrases the same corpus differently
    hidden = set(held_out(world, cfg))
    safe = []
    for d in world.drugs:
        for i in range(cfg.drug_note_copies):
            text = t.drug_note[i % len(t.drug_note)].format(
                drug=d.name, treated=d.treats, danger=d.dangerous_with)
            safe.append(_passage(text, "drug_note", drug=d.name))
    for p in world.patients:
        for i in range(cfg.record_copies):
            text = t.record[i % len(t.record)].format(**facts(world, p))
            safe.append(_passage(text, "record", patient=p.name))
    known = [p for p in world.patients if p.name not in hidden]
    safe += [qa_item(world, t, kind, p, words) for p in known for kind in SAFE_KINDS
             for _ in range(cfg.qa_copies)]
    n_unsafe = round(cfg.unsafe_share * len(safe) / (1 - cfg.unsafe_share))
    # Unsafe passages about known patients, the kinds in turn, each patient once per kind.
    pools = {kind: rng.sample(known, len(known)) for kind in HARMFUL_KINDS}
    unsafe: list[dict] = []
    while len(unsafe) < n_unsafe and any(pools.values()):
        for kind in HARMFUL_KINDS:
            if pools[kind] and len(unsafe) < n_unsafe:
                unsafe.append(qa_item(world, t, kind, pools[kind].pop(), words))
    corpus = safe + unsafe
    rng.shuffle(corpus)
    for i, item in enumerate(corpus):
        item["id"] = f"msw-{world.seed}-{i}"
    return corpus


def write_corpus(corpus: list[dict], path: str | Path) -> None:
    from megatron_srp.units import write_atomic
    write_atomic(path, "".join(json.dumps(item) + "\n" for item in corpus))


def read_corpus(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
