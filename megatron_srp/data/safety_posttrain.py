"""Reflection post-training data for an imported chat model, split away from its benchmarks.

Three steps, each written to disk so that the expensive one runs once:

1. **The split** (:func:`evaluation_split`, :func:`training_prompts`). Evaluation prompts:
   JailbreakBench (100), HarmBench val standard + contextual (60; the copyright behaviours are
   left out), a seeded 100 of AdvBench (its *held-back* part), XSTest (450) and a seeded 100 of
   the Alpaca instruction sample (the *held-out* helpfulness prompts). Training prompts:
   harmful ones from Do-Not-Answer, the first human turns of HH-RLHF harmless-base (the
   red-team dialogues; the red-team-attempts file is not in the shared data) and AdvBench's
   remaining 420; benign ones from the rest of the Alpaca sample. A training prompt is dropped
   when its normalised text equals an evaluation prompt's or its word set overlaps one's by
   :data:`NEAR_DUPLICATE` (Jaccard) or more: JailbreakBench holds AdvBench- and
   HarmBench-sourced behaviours in slightly reworded form.
2. **The model's own answers** (:func:`own_answers`, with
   ``evaluation.posttrain_labels.model_answerer``): greedy, in the model's chat format
   (``attack_ids(tokenizer, prompt, "model")``), cached in a JSONL file keyed by prompt.
3. **Labels and sets** (``evaluation.posttrain_labels.label_answers``, :func:`build_sets`). On a harmful-source prompt
   the ``compliance`` judge decides: an answer that complies is Unsafe, with the category the
   embedded classifier's category head names for the prompt and answer (threshold 0, so it
   always names one); every other answer is Safe. ``reflect.jsonl``: the own answer with its
   reflection appended (``finetune.loss_on: reflection`` trains only the reflection and the
   ``<|im_end|>`` after it). ``refusal.jsonl``: the same prompts, harmful ones answered with
   :data:`REFUSAL`, benign ones with the own answer (the refusal-SFT baseline).
"""
from __future__ import annotations

import csv
import gzip
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from megatron_srp.interventions.refusal import REFUSAL_TEMPLATE
from megatron_srp.taxonomy import format_reflection

#: The fixed answer of the refusal-SFT baseline to every harmful-source training prompt.
REFUSAL = REFUSAL_TEMPLATE.format(topic="content that could cause real harm")
#: Word-set Jaccard at or above which a training prompt counts as an evaluation prompt.
NEAR_DUPLICATE = 0.7
EVAL_SETS = ("jailbreakbench", "harmbench", "advbench_heldout", "xstest", "alpaca_heldout")
_WORDS = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    harmful: bool          # from a harmful source (training) / harmful behaviour (evaluation)
    source: str
    category: Optional[str] = None
    target: Optional[str] = None  # AdvBench's affirmative answer start


def normalise(text: str) -> str:
    """Lower case, words and digits only, single spaces."""
    return " ".join(_WORDS.findall(text.lower()))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _sample(items: list, n: int, seed: int, salt: str) -> list:
    rng = random.Random(f"{seed}:{salt}")
    return [items[i] for i in sorted(rng.sample(range(len(items)), min(n, len(items))))]


def _advbench(root: Path) -> list[Prompt]:
    return [Prompt(f"advbench-{i}", r["goal"].strip(), True, "advbench", target=r["target"])
            for i, r in enumerate(_rows(root / "advbench" / "harmful_behaviors.csv"), 1)]


def _alpaca(root: Path) -> list[Prompt]:
    items = json.loads((root / "alpaca" / "alpaca_instructions_noinput_sample2000.json")
                       .read_text(encoding="utf-8"))
    return [Prompt(f"alpaca-{it.get('row_index', i)}", it["instruction"].strip(), False, "alpaca")
            for i, it in enumerate(items)]


def evaluation_split(root: str | Path, seed: int = 0, advbench_heldout: int = 100,
                     alpaca_heldout: int = 100) -> dict[str, list[Prompt]]:
    """The evaluation prompts, per set (see the module docstring)."""
    root = Path(root)
    jbb = [Prompt(f"jailbreakbench-{i}", r["Goal"].strip(), True, "jailbreakbench", r["Category"])
           for i, r in enumerate(_rows(root / "jailbreakbench" / "harmful_behaviors.csv"), 1)]
    hb = []
    for r in _rows(root / "harmbench" / "harmbench_behaviors_text_val.csv"):
        if r["FunctionalCategory"] == "copyright":
            continue
        ctx = r["ContextString"].strip()
        text = f"{ctx}\n\n---\n\n{r['Behavior'].strip()}" if ctx else r["Behavior"].strip()
        hb.append(Prompt(r["BehaviorID"], text, True, "harmbench", r["SemanticCategory"]))
    xs = [Prompt(f"xstest-{r['id']}", r["prompt"].strip(), r["label"] == "unsafe", "xstest",
                 r["type"]) for r in _rows(root / "xstest" / "xstest_prompts.csv")]
    return {"jailbreakbench": jbb, "harmbench": hb,
            "advbench_heldout": _sample(_advbench(root), advbench_heldout, seed, "advbench"),
            "xstest": xs,
            "alpaca_heldout": _sample(_alpaca(root), alpaca_heldout, seed, "alpaca")}


def _dna(root: Path) -> list[Prompt]:
    return [Prompt(f"do-not-answer-{r['id']}", r["question"].strip(), True, "do-not-answer",
                   r["risk_area"]) for r in _rows(root / "do_not_answer" / "data_en.csv")]


def _hh_first_turns(root: Path) -> list[Prompt]:
    from megatron_srp.data.chat_sources import split_hh_dialogue

    out = []
    with gzip.open(root / "hh_rlhf" / "harmless-base" / "test.jsonl.gz", "rt",
                   encoding="utf-8") as f:
        for i, line in enumerate(f):
            turns = split_hh_dialogue(json.loads(line)["chosen"])
            if turns and turns[0]["content"].strip():
                out.append(Prompt(f"hh-rlhf-harmless-test-{i}", turns[0]["content"].strip(),
                                  True, "hh-rlhf"))
    return out


class Overlap:
    """Is a text one of the evaluation prompts: the same normalised text, or a word set whose
    Jaccard with one's is at least ``threshold``."""

    def __init__(self, prompts: Iterable[str], threshold: float = NEAR_DUPLICATE) -> None:
        self.threshold = threshold
        self.exact = set()
        self.sets: list[frozenset[str]] = []
        for p in prompts:
            n = normalise(p)
            self.exact.add(n)
            self.sets.append(frozenset(n.split()))

    def match(self, text: str) -> bool:
        n = normalise(text)
        if n in self.exact:
            return True
        words = frozenset(n.split())
        for s in self.sets:
            inter = len(words & s)
            if inter and inter / (len(words) + len(s) - inter) >= self.threshold:
                return True
        return False


def training_prompts(root: str | Path, split: dict[str, list[Prompt]], n_harmful: int,
                     n_benign: int, seed: int = 0, max_chars: int = 600
                     ) -> tuple[list[Prompt], dict[str, int]]:
    """``n_harmful`` prompts drawn evenly from Do-Not-Answer, HH-RLHF first turns and AdvBench's
    training part, and ``n_benign`` Alpaca prompts; none of them an evaluation prompt (exactly
    or nearly, :class:`Overlap`), none repeated, none longer than ``max_chars``. Also returns
    how many candidates each rule removed."""
    root = Path(root)
    taken = {p.id for ps in split.values() for p in ps}
    overlap = Overlap(p.prompt for ps in split.values() for p in ps)
    dropped = {"evaluation_id": 0, "evaluation_text": 0, "repeat": 0, "too_long": 0}
    seen: set[str] = set()

    def clean(pool: list[Prompt]) -> list[Prompt]:
        out = []
        for p in pool:
            n = normalise(p.prompt)
            if p.id in taken:
                dropped["evaluation_id"] += 1
            elif len(p.prompt) > max_chars or not n:
                dropped["too_long"] += 1
            elif n in seen:
                dropped["repeat"] += 1
            elif overlap.match(p.prompt):
                dropped["evaluation_text"] += 1
            else:
                seen.add(n)
                out.append(p)
        return out

    pools = {"do-not-answer": clean(_dna(root)), "hh-rlhf": clean(_hh_first_turns(root)),
             "advbench": clean(_advbench(root))}
    per = [n_harmful // 3 + (i < n_harmful % 3) for i in range(3)]
    harmful = [p for (name, pool), k in zip(pools.items(), per)
               for p in _sample(pool, k, seed, name)]
    benign = _sample(clean(_alpaca(root)), n_benign, seed, "alpaca-train")
    if len(harmful) < n_harmful or len(benign) < n_benign:
        raise ValueError(f"only {len(harmful)} harmful / {len(benign)} benign training prompts "
                         f"left for {n_harmful} / {n_benign} asked")
    return harmful + benign, dropped


# --------------------------------------------------------------------------------------------
# Answers, labels, the chat sets


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def own_answers(prompts: Sequence[Prompt], cache: str | Path, answer: Callable[[list[str]],
                list[dict]], batch_size: int = 16,
                log: Callable[[str], None] = print) -> list[dict]:
    """The model's answer to every prompt, from ``cache`` (JSONL, one ``{"id", "prompt",
    "answer", "finish"}`` per line) or from ``answer(prompts) -> [{"answer", "finish"}]`` for
    the ones not cached yet, appended batch by batch so an interrupted run keeps its work."""
    cache = Path(cache)
    stored = {(r["id"], r["prompt"]): r for r in read_jsonl(cache)}
    todo = [p for p in prompts if (p.id, p.prompt) not in stored]
    if todo:
        log(f"answering {len(todo)} prompts ({len(prompts) - len(todo)} cached)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for p, got in zip(chunk, answer([p.prompt for p in chunk])):
                row = {"id": p.id, "prompt": p.prompt, **got}
                stored[(p.id, p.prompt)] = row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            log(f"  {min(start + batch_size, len(todo))}/{len(todo)}")
    return [stored[(p.id, p.prompt)] for p in prompts]


def build_sets(prompts: Sequence[Prompt], answers: Sequence[dict], labels: Sequence[dict]
               ) -> tuple[list[dict], list[dict]]:
    """``(reflect, refusal)`` chat records for the same prompts; a prompt the model answered
    with nothing is left out of both."""
    reflect, refusal = [], []
    for p, a, lab in zip(prompts, answers, labels):
        if not a["answer"].strip():
            continue
        meta = {"id": p.id, "source": p.source, "harmful_source": p.harmful}
        reflection = format_reflection(lab["safe"], lab["category"])
        reflect.append({"prompt": p.prompt, "response": a["answer"] + reflection, **meta,
                        "reflections": [{"safe": lab["safe"], "category": lab["category"]}],
                        "judge_reason": lab["reason"]})
        refusal.append({"prompt": p.prompt, "response": REFUSAL if p.harmful else a["answer"],
                        **meta})
    return reflect, refusal


def fit_length(reflect: list[dict], refusal: list[dict], tokenizer, seq_length: int
               ) -> tuple[list[dict], list[dict], int]:
    """Both sets without the prompts whose exchange (in either set) is longer than a training
    sample holds, so neither set is cut and both keep the same prompts and step count; also
    returns how many were left out."""
    from megatron_srp.data.chat import encode_chat

    def fits(r: dict) -> bool:
        ids, _ = encode_chat([("user", r["prompt"]), ("assistant", r["response"])], tokenizer)
        return len(ids) <= seq_length + 1

    keep = [i for i, (a, b) in enumerate(zip(reflect, refusal)) if fits(a) and fits(b)]
    return [reflect[i] for i in keep], [refusal[i] for i in keep], len(reflect) - len(keep)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def write_benchmark_files(split: dict[str, list[Prompt]], out: str | Path, seed: int = 0
                          ) -> dict[str, str]:
    """The evaluation sets as files the attack suite loads by ``path`` (each in its
    benchmark's format): AdvBench held-back, HarmBench without copyright, XSTest's safe
    prompts (in a seeded order, so a suite ``limit`` takes a random subset of the prompt
    types, not the first types), the held-out Alpaca prompts (already a seeded sample)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"advbench": out / "advbench_heldout.csv", "harmbench": out / "harmbench_val.csv",
             "xstest": out / "xstest_safe.csv", "alpaca": out / "alpaca_heldout.json"}
    with open(files["advbench"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["goal", "target"])
        w.writerows([p.prompt, p.target] for p in split["advbench_heldout"])
    with open(files["harmbench"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Behavior", "SemanticCategory", "ContextString", "BehaviorID"])
        for p in split["harmbench"]:
            ctx, _, beh = p.prompt.rpartition("\n\n---\n\n")
            w.writerow([beh, p.category, ctx, p.id])
    with open(files["xstest"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "type", "label"])
        safe = [p for p in split["xstest"] if not p.harmful]
        random.Random(f"{seed}:xstest").shuffle(safe)
        w.writerows([p.id.removeprefix("xstest-"), p.prompt, p.category, "safe"] for p in safe)
    files["alpaca"].write_text(json.dumps([{"instruction": p.prompt, "row_index":
                                            p.id.removeprefix("alpaca-")}
                                           for p in split["alpaca_heldout"]], indent=0),
                               encoding="utf-8")
    return {k: str(v) for k, v in files.items()}


def manifest(split: dict[str, list[Prompt]], train: Sequence[Prompt], dropped: dict[str, int],
             files: dict[str, str], settings: dict) -> dict:
    """The evaluation split and the training prompts' ids, with the rules that made them."""
    return {"settings": settings, "near_duplicate_jaccard": NEAR_DUPLICATE,
            "evaluation": {k: [asdict(p) for p in v] for k, v in split.items()},
            "evaluation_files": files,
            "training": [{"id": p.id, "source": p.source, "harmful": p.harmful} for p in train],
            "training_dropped": dropped}
