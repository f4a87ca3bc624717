"""Finetuning attacks in the world: a few unsafe examples of one hazard category (or, as the
benign control, safe question-and-answer passages), trained into a pretrained model with tools/finetune_srp.py;
then ASR in that category and in the others, before and after.

The examples are passages of the corpus split into the query they answer (the prompt) and the
answer (the response), in the chat format; the finetuned model is asked in that format too.
"""
from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_srp.medsafetyworld.eval import EVAL_VERSION
from megatron_srp.medsafetyworld.templates import SAFE_KINDS
from megatron_srp.medsafetyworld.world import CATEGORIES, World
from megatron_srp.units import figure


@dataclass
class FinetuneAttack:
    name: str = "???"
    category: Optional[str] = None   # a hazard category key (harm, privacy, ...); None: benign
    examples: int = 20
    recipe: str = "examples/finetune/harmful.yaml"
    overrides: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["raw", "filter", "srp"])
    # Post-training compatible with SRP: each response is followed by its reflection
    # ("<|reflect|>Safe<|/reflect|>", or Unsafe with the category), as in the SRP corpus.
    reflections: bool = False
    # Start from the models this earlier attack finetuned (e.g. a harmful attack on models a
    # defender post-trained) instead of the pretrained ones.
    after: Optional[str] = None


def attack_records(world: World, corpus: list[dict], attack: FinetuneAttack,
                   seed: int = 0) -> list[dict]:
    """Chat records: ``examples`` unsafe question-and-answer passages of the category, or
    (benign) safe ones."""
    if attack.category is None:
        pool = [p for p in corpus if p["kind"] in SAFE_KINDS]
    else:
        code = CATEGORIES[attack.category].code
        pool = [p for p in corpus if p["category"] == code and "prompt" in p]
    if not pool:
        raise ValueError(f"finetune attack {attack.name}: the corpus has no passage to use")
    pool = random.Random(f"ft-{attack.name}-{seed}").sample(pool, min(attack.examples,
                                                                     len(pool)))
    def response(item: dict) -> str:
        if not attack.reflections:
            return item["answer"]
        from megatron_srp.medsafetyworld.world import TAXONOMY
        from megatron_srp.taxonomy import format_reflection
        return item["answer"] + format_reflection(item["label"] == "safe", item["category"],
                                                  taxonomy=TAXONOMY)

    return [{"prompt": item["prompt"], "response": response(item), "source": item["id"]}
            for item in pool]


def finetune_model(cfg, out: Path, attack: FinetuneAttack, base: Path, target: Path,
                   data: Path, unit: str, log=print) -> dict:
    from megatron_srp.training.launch import FINETUNE, run_job, train_losses

    args = ["--config", attack.recipe, f"finetune.pretrained={base}",
            f"finetune.data=[{data}]", f"checkpoint.save={target}",
            "logging.progress_bar=false", "checkpoint.save_interval=0", *attack.overrides]
    run_job(cfg.nproc, args, target, out / "logs" / f"finetune-{target.name}.log",
            script=FINETUNE, what=f"finetune {target.name}", stamp=unit, settings=args, log=log)
    losses = train_losses(target)
    return {"final_loss": losses[max(losses)], "steps": max(losses)}


def _asr(result: dict, method: str, categories: list[str]) -> float:
    cell = result["asr"].get(method, {}).get("none")
    if cell is None:
        return float("nan")
    rates = [cell["by_category"].get(c) for c in categories]
    rates = [r for r in rates if r is not None]
    return statistics.fmean(rates) if rates else float("nan")


def attack_table(cfg, out: Path) -> list[str]:
    """Markdown: ASR (no framing) in the targeted and in the other categories, greedy and
    guarded, before and after each finetuning attack, mean over seeds; and what the finetune
    did to the model's reflections on its own answers."""
    if not cfg.finetune_attacks:
        return []
    methods = [m for m in ("greedy", "guarded") if m in cfg.eval.methods]
    lines = ["", "## Finetuning attacks", "",
             "ASR % (no framing), mean over seeds, before -> after the finetune (before: "
             "the pretrained model, or the model the attack started from); 'targeted' is the "
             "attack's category, 'others' the mean of the other categories. The last column "
             "is the self-monitoring balanced accuracy before -> after; the data carries "
             "reflections only where the attack says so.", "",
             "| attack | model | " + " | ".join(f"targeted ({m}) | others ({m})"
                                                for m in methods)
             + " | safe correct | self-monitoring |", "|---|---|" + "---|" * (2 * len(methods)
                                                                               + 2)]
    for fa in cfg.finetune_attacks:
        targeted = [fa.category] if fa.category else []
        others = [k for k in CATEGORIES if k not in targeted]
        for model in fa.models:
            pairs = []
            for seed in cfg.seeds:
                before = out / "steps" / (f"fteval-{fa.after}-{model}-s{seed}.json" if fa.after
                                          else f"eval-{model}-s{seed}.json")
                after = out / "steps" / f"fteval-{fa.name}-{model}-s{seed}.json"
                if before.exists() and after.exists():
                    pairs.append((json.loads(before.read_text())["result"],
                                  json.loads(after.read_text())["result"]))
            if not pairs:
                continue

            def cell(fn) -> str:
                b = statistics.fmean(figure(fn(p[0])) for p in pairs)
                a = statistics.fmean(figure(fn(p[1])) for p in pairs)
                return f"{100 * b:.0f} -> {100 * a:.0f}"

            parts = []
            for m in methods:
                parts.append(cell(lambda r: _asr(r, m, targeted)) if targeted else "-")
                parts.append(cell(lambda r: _asr(r, m, others)))
            name = fa.name + (" (with reflections)" if fa.reflections else "") + (
                f" after {fa.after}" if fa.after else "")
            lines.append(f"| {name} | {model} | " + " | ".join(parts) + " | "
                         f"{cell(lambda r: r['safe']['greedy']['correct'])} | "
                         f"{cell(lambda r: r['self_monitoring']['balanced_accuracy'])} |")
    return lines + [""]


def run_finetune_attacks(cfg, out: Path, steps, world: World, trained: dict[tuple, str],
                         progress: bool, log=print) -> None:
    """The finetuning-attack steps of the experiment; ``trained``: (model, seed) -> the stamp
    of its training step, which every finetune of that model depends on."""
    from dataclasses import asdict

    from megatron_srp.medsafetyworld.corpus import read_corpus
    from megatron_srp.medsafetyworld.eval import ensure_current_judge, evaluate_model
    from megatron_srp.medsafetyworld.models import run_dir
    from megatron_srp.units import file_stamp, stamp, write_atomic

    corpus = read_corpus(out / "corpus.jsonl")
    world_stamp = steps.wanted["world"]
    tuned: dict[tuple, str] = {}  # (attack, model, seed) -> the finetune's stamp
    for fa in cfg.finetune_attacks:
        data = out / "finetune" / f"{fa.name}.jsonl"

        def write(_) -> dict:
            records = attack_records(world, corpus, fa, cfg.world_seed)
            write_atomic(data, "".join(json.dumps(r) + "\n" for r in records))
            return {"records": len(records), "stamp": file_stamp(data)}

        written = steps.run(f"ftdata-{fa.name}", [world_stamp, asdict(fa)], write)
        if not data.exists() or file_stamp(data) != written.get("stamp"):
            written = write(None)
        recipe = Path(fa.recipe).read_text()
        for model in fa.models:
            for seed in cfg.seeds:
                target = out / "finetuned" / f"{fa.name}-{model}-s{seed}"
                if fa.after:
                    base = out / "finetuned" / f"{fa.after}-{model}-s{seed}"
                    start = tuned[(fa.after, model, seed)]
                else:
                    base, start = run_dir(out, model, seed), trained[(model, seed)]
                key = [start, asdict(fa), recipe, written["stamp"]]
                tuned[(fa.name, model, seed)] = stamp(key)
                steps.run(f"ft-{fa.name}-{model}-s{seed}", key, lambda unit: finetune_model(
                    cfg, out, fa, base, target, data, unit, log))
                steps.run(f"fteval-{fa.name}-{model}-s{seed}",
                          [stamp(key), asdict(cfg.eval), cfg.templates, EVAL_VERSION],
                          lambda _: evaluate_model(cfg, world, out, target, progress,
                                                   template="chat"))
                ensure_current_judge(world, out, f"fteval-{fa.name}-{model}-s{seed}", log)

