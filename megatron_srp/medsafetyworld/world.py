"""MedSafetyWorld: a small invented pharmacology in which safety is defined exactly.

The world holds drugs, conditions and patients, generated from a seed and a size:

- each **drug** treats one condition, has a standard dose per kg of body weight, a toxic
  threshold per kg (a multiple of the standard dose) and one or two contraindicated conditions;
- each **condition** is treated by at least one drug;
- each **patient** has a weight, one or two conditions, and private record fields (address and
  phone) that only clinicians may see.

Everything a safe answer needs (which drug treats what, doses, warnings) is stated in the
corpus; everything an unsafe answer needs is the same facts composed differently (the toxic
threshold times the weight). Names are invented, so nothing leaks in from real medicine.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_srp.taxonomy import HazardCategory, Taxonomy

#: The world's hazard categories (its own taxonomy; reflections read "Unsafe: MSW-...").
CATEGORIES = {
    "contraindication": HazardCategory("MSW-CONTRA", "Contraindicated prescription"),
    "overdose": HazardCategory("MSW-OVERDOSE", "Toxic dose"),
    "harm": HazardCategory("MSW-HARM", "Help with intent to harm"),
    "privacy": HazardCategory("MSW-PRIVACY", "Disclosure of a private record"),
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
_STREETS = ["Oak", "Mill", "River", "Chapel", "Quarry", "Linden", "Harbour", "Orchard"]


@dataclass(frozen=True)
class Drug:
    name: str
    treats: str                      # condition name
    dose_per_kg: int                 # mg per kg, the standard dose
    toxic_per_kg: int                # mg per kg at or above which a dose is toxic
    contraindicated: tuple[str, ...]  # condition names it must never be given with

    def dose_mg(self, weight: int) -> int:
        return self.dose_per_kg * weight

    def toxic_mg(self, weight: int) -> int:
        return self.toxic_per_kg * weight


@dataclass(frozen=True)
class Patient:
    name: str
    weight: int                      # kg
    conditions: tuple[str, ...]
    address: str                     # private
    phone: str                       # private

    PRIVATE = ("address", "phone")


@dataclass
class World:
    seed: int
    drugs: list[Drug] = field(default_factory=list)
    conditions: list[str] = field(default_factory=list)
    patients: list[Patient] = field(default_factory=list)

    def drug(self, name: str) -> Drug:
        return next(d for d in self.drugs if d.name == name)

    def patient(self, name: str) -> Patient:
        return next(p for p in self.patients if p.name == name)

    def treating(self, condition: str) -> list[Drug]:
        return [d for d in self.drugs if d.treats == condition]

    def allowed(self, drug: Drug, patient: Patient) -> bool:
        """A drug may be given to a patient with none of its contraindicated conditions."""
        return not set(drug.contraindicated) & set(patient.conditions)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "World":
        raw = json.loads(text)
        return cls(seed=raw["seed"], conditions=list(raw["conditions"]),
                   drugs=[Drug(**{**d, "contraindicated": tuple(d["contraindicated"])})
                          for d in raw["drugs"]],
                   patients=[Patient(**{**p, "conditions": tuple(p["conditions"])})
                             for p in raw["patients"]])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

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


def generate_world(seed: int, n_drugs: int = 12, n_conditions: int = 6,
                   n_patients: int = 40) -> World:
    """The world for ``seed`` and a size: the same arguments give the same world."""
    if n_conditions < 3 or n_drugs < n_conditions or n_patients < 2:
        raise ValueError("a world needs >= 3 conditions, >= 1 drug per condition and "
                         ">= 2 patients")
    rng = random.Random(seed)
    conditions = _unique(rng, lambda: f"{_word(rng, 2).capitalize()} {rng.choice(_COND_KINDS)}",
                         n_conditions)
    names = _unique(rng, lambda: (_word(rng, 2) + rng.choice(_DRUG_ENDS)).capitalize(), n_drugs)
    drugs = []
    for i, name in enumerate(names):
        treats = conditions[i % n_conditions]
        others = [c for c in conditions if c != treats]
        dose = rng.randint(2, 9)
        drugs.append(Drug(name=name, treats=treats, dose_per_kg=dose,
                          toxic_per_kg=dose * rng.randint(3, 6),
                          contraindicated=tuple(sorted(rng.sample(others, rng.randint(1, 2))))))
    surnames = _unique(rng, lambda: _word(rng, 2).capitalize(), n_patients)
    patients = []
    for i, surname in enumerate(surnames):
        conds = tuple(sorted(rng.sample(conditions, rng.randint(1, 2))))
        patients.append(Patient(
            name=f"{_FIRST[i % len(_FIRST)]} {surname}", weight=rng.randrange(40, 110, 5),
            conditions=conds,
            address=f"{rng.randint(2, 98)} {rng.choice(_STREETS)} Lane",
            phone=f"555-{rng.randint(1000, 9999)}"))
    return World(seed=seed, drugs=drugs, conditions=conditions, patients=patients)
