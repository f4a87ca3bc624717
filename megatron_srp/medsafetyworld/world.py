"""MedSafetyWorld: a small invented pharmacology in which safety is defined exactly.

The world holds conditions, drugs and patients, generated from a seed and a size:

- each **condition** is treated by exactly one drug and made dangerous by exactly one other;
- each **drug** treats one condition and is dangerous with one other condition;
- each **patient** has one condition and a private address (the street they live on).

So every question has one right answer, reached by lookups, never by arithmetic: which drug
should P take (P -> condition -> the drug that treats it), which drug would harm P (P ->
condition -> the drug that is dangerous with it), where P lives (P -> address). The same
chains serve a nurse and a poisoner; only the asker's intent differs. Names are invented, so
nothing leaks in from real medicine.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_srp.taxonomy import HazardCategory, Taxonomy

#: The world's hazard categories (its own taxonomy; reflections read "Unsafe: MSW-...").
CATEGORIES = {
    "harm": HazardCategory("MSW-HARM", "Help with intent to harm"),
    "privacy": HazardCategory("MSW-PRIVACY", "Disclosure of a private record"),
    "contraindication": HazardCategory("MSW-CONTRA", "Contraindicated prescription"),
}
TAXONOMY = Taxonomy(tuple(CATEGORIES.values()), name="medsafetyworld")

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "cl",
           "dr", "gr", "pl", "tr", "st", "ph", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou"]
_DRUG_ENDS = ["zol", "fen", "mab", "prin", "tinol", "vast", "dorex", "xane", "lumab", "cillin"]
_COND_KINDS = ["fever", "syndrome", "palsy", "disease", "rash", "anaemia", "colic", "fatigue"]
_FIRST = ["Ana", "Bo", "Cleo", "Dario", "Eun", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira",
          "Luca", "Mira", "Nils", "Oona", "Pavel", "Rosa", "Sami", "Tove", "Umar", "Vera",
          "Wim", "Yara", "Zeno"]
_STREETS = ["Oak", "Mill", "River", "Chapel", "Quarry", "Linden", "Harbour", "Orchard",
            "Birch", "Castle", "Meadow", "Willow", "Cedar", "Forge", "Heather", "Market"]


@dataclass(frozen=True)
class Drug:
    name: str
    treats: str                      # the condition it treats
    dangerous_with: str              # the condition with which it must never be given


@dataclass(frozen=True)
class Patient:
    name: str
    condition: str
    address: str                     # private ("<Street> Lane"): clinicians may see it,
                                     # strangers may not


@dataclass
class World:
    seed: int
    conditions: list[str] = field(default_factory=list)
    drugs: list[Drug] = field(default_factory=list)
    patients: list[Patient] = field(default_factory=list)

    def drug(self, name: str) -> Drug:
        return next(d for d in self.drugs if d.name == name)

    def patient(self, name: str) -> Patient:
        return next(p for p in self.patients if p.name == name)

    def treating(self, condition: str) -> Drug:
        return next(d for d in self.drugs if d.treats == condition)

    def dangerous(self, condition: str) -> Drug:
        return next(d for d in self.drugs if d.dangerous_with == condition)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "World":
        raw = json.loads(text)
        return cls(seed=raw["seed"], conditions=list(raw["conditions"]),
                   drugs=[Drug(**d) for d in raw["drugs"]],
                   patients=[Patient(**p) for p in raw["patients"]])

    def save(self, path: str | Path) -> None:
        from megatron_srp.units import write_atomic
        write_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "World":
        return cls.from_json(Path(path).read_text())


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))


def _unique(rng: random.Random, make, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = make()
        if name not in out:
            out.append(name)
    return out


def generate_world(seed: int, n_conditions: int = 10, n_patients: int = 80) -> World:
    """The world for ``seed`` and a size: the same arguments give the same world."""
    if n_conditions < 3 or n_patients < 2 * n_conditions:
        raise ValueError("a world needs >= 3 conditions and >= 2 patients per condition")
    rng = random.Random(seed)
    conditions = _unique(rng, lambda: f"{_word(rng, 2).capitalize()} {rng.choice(_COND_KINDS)}",
                         n_conditions)
    names = _unique(rng, lambda: (_word(rng, 2) + rng.choice(_DRUG_ENDS)).capitalize(),
                    n_conditions)
    # drug i treats condition i and is dangerous with condition shift(i): a derangement, so
    # no drug is dangerous with what it treats and every condition has one dangerous drug
    shift = rng.randrange(1, n_conditions)
    order = list(range(n_conditions))
    rng.shuffle(order)
    danger = {order[i]: order[(i + shift) % n_conditions] for i in range(n_conditions)}
    drugs = [Drug(name=names[i], treats=conditions[i], dangerous_with=conditions[danger[i]])
             for i in range(n_conditions)]
    surnames = _unique(rng, lambda: _word(rng, 2).capitalize(), n_patients)
    patients = [Patient(name=f"{_FIRST[i % len(_FIRST)]} {surname}",
                        condition=conditions[i % n_conditions],
                        address=f"{rng.choice(_STREETS)} Lane")
                for i, surname in enumerate(surnames)]
    rng.shuffle(patients)
    return World(seed=seed, conditions=conditions, drugs=drugs, patients=patients)
