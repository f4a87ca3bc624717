"""Chat JSONL for the finetuning stages, converted from the public sets in the shared data.

| source | records | use |
|---|---|---|
| ``alpaca-seed`` | Alpaca's 175 seed tasks, instruction (+ input) -> output | instruction tuning |
| ``do-not-answer-refusals`` | Do-Not-Answer requests -> a model's refusal (action 0, harmless) | safety data inside instruction tuning |
| ``gsm8k`` | question -> worked answer | the benign finetune |
| ``do-not-answer-harmful`` | Do-Not-Answer requests -> an answer humans marked harmful | the harmful finetuning attack |
| ``hh-rlhf-rejected`` | HH-RLHF harmless-base dialogues ending in the rejected (less harmless) answer | a larger harmful attack set |

Each writes ``{"prompt", "response", "source"}`` records (``messages`` for multi-turn HH-RLHF),
the format :mod:`megatron_srp.data.chat` reads. The harmful sets are attack data: keep them out
of pretraining corpora.
"""
from __future__ import annotations

import csv
import gzip
import json
import random
from pathlib import Path
from typing import Callable, Iterator, Optional

DNA_MODELS = ("GPT4", "ChatGPT", "Claude", "ChatGLM2", "llama2-7b-chat", "vicuna-7b")


def _alpaca_seed(root: Path) -> Iterator[dict]:
    with open(root / "alpaca" / "seed_tasks.jsonl", encoding="utf-8") as f:
        for line in f:
            task = json.loads(line)
            for inst in task["instances"]:
                prompt = task["instruction"] + (f"\n\n{inst['input']}" if inst["input"] else "")
                if inst["output"].strip():
                    yield {"prompt": prompt, "response": inst["output"], "source": task["id"]}


def _dna_rows(root: Path) -> Iterator[dict]:
    with open(root / "do_not_answer" / "data_en.csv", encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)


def _dna(root: Path, harmful: bool) -> Iterator[dict]:
    """Do-Not-Answer answers by six models with human labels: harmful ones, or refusals
    (action 0: the model refused) that were judged harmless."""
    for row in _dna_rows(root):
        for m in DNA_MODELS:
            is_harmful = row[f"{m}_harmful"] == "1"
            keep = is_harmful if harmful else (not is_harmful and row[f"{m}_action"] == "0")
            if keep and row[f"{m}_response"].strip():
                yield {"prompt": row["question"], "response": row[f"{m}_response"],
                       "source": f"do-not-answer-{row['id']}-{m}"}


def _gsm8k(root: Path) -> Iterator[dict]:
    with open(root / "gsm8k" / "train_sample2000.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            yield {"prompt": r["question"], "response": r["answer"], "source": f"gsm8k-{i}"}


def split_hh_dialogue(text: str) -> list[dict]:
    """HH-RLHF's ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcript as chat messages."""
    messages = []
    for part in text.split("\n\nHuman: ")[1:]:
        human, _, rest = part.partition("\n\nAssistant: ")
        messages.append({"role": "user", "content": human.strip()})
        if rest.strip():
            messages.append({"role": "assistant", "content": rest.strip()})
    return messages


def _hh_rejected(root: Path) -> Iterator[dict]:
    with gzip.open(root / "hh_rlhf" / "harmless-base" / "test.jsonl.gz", "rt",
                   encoding="utf-8") as f:
        for i, line in enumerate(f):
            messages = split_hh_dialogue(json.loads(line)["rejected"])
            if messages and messages[-1]["role"] == "assistant":
                yield {"messages": messages, "source": f"hh-rlhf-harmless-test-{i}"}


SOURCES: dict[str, Callable[[Path], Iterator[dict]]] = {
    "alpaca-seed": _alpaca_seed,
    "do-not-answer-refusals": lambda root: _dna(root, harmful=False),
    "gsm8k": _gsm8k,
    "do-not-answer-harmful": lambda root: _dna(root, harmful=True),
    "hh-rlhf-rejected": _hh_rejected,
}


def write_chat_source(name: str, shared_data: str | Path, out: str | Path,
                      limit: Optional[int] = None, seed: int = 0,
                      transform: Optional[Callable[[list[dict]], list[dict]]] = None) -> int:
    """Write source ``name`` as chat JSONL (a seeded sample of ``limit`` records when given,
    then ``transform``, e.g. :class:`~megatron_srp.data.chat_reflect.ChatReflection`); returns
    the number of records. The file appears only when complete."""
    if name not in SOURCES:
        raise ValueError(f"unknown chat source {name!r}; choose from {', '.join(SOURCES)}")
    root = Path(shared_data)
    if not root.is_dir():
        raise FileNotFoundError(f"shared data directory {root} does not exist")
    records = list(SOURCES[name](root))
    if limit is not None and limit < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), limit))
        records = [records[i] for i in keep]
    if transform is not None:
        records = transform(records)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return len(records)
