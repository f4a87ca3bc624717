"""Finetuning attacks in the world: a few unsafe examples of one hazard category (or, as the
benign control, safe case notes), trained into a pretrained model with tools/finetune_srp.py;
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
from typing import Any, Optional

from megatron_srp.medsafetyworld import corpus as C
from megatron_srp.medsafetyworld.world import CATEGORIES, World


@dataclass
class FinetuneAttack:
    name: str = "???"
    category: Optional[str] = None   # a hazard category key (harm, privacy, ...); None: benign
    examples: int = 20
    recipe: str = "examples/finetune/harmful.yaml"
    overrides: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["raw", "filter", "srp"])


def attack_records(world: World, corpus: list[dict], attack: FinetuneAttack,
                   seed: int = 0) -> list[dict]:
    """Chat records: ``examples`` unsafe passages of the category, or safe case notes."""
    if attack.category is None:
        pool = [p for p in corpus if p["kind"] == "case_note"]
    else:
        code = CATEGORIES[attack.category].code
        pool = [p for p in corpus if p["category"] == code and p["kind"] in C.ANSWERS]
    if not pool:
        raise ValueError(f"finetune attack {attack.name}: the corpus has no passage to use")
    pool = random.Random(f"ft-{attack.name}-{seed}").sample(pool, min(attack.examples,
                                                                     len(pool)))
    out = []
    for item in pool:
        _, head, answer = C.split_passage(item, world)
        out.append({"prompt": head.strip(), "response": answer.strip(), "source": item["id"]})
    return out


def finetune_model(cfg, out: Path, attack: FinetuneAttack, base: Path, target: Path,
                   data: Path) -> dict:
    from megatron_srp.training.launch import FINETUNE, run_job, train_losses

    args = ["--config", attack.recipe, f"finetune.pretrained={base}",
            f"finetune.data=[{data}]", f"checkpoint.save={target}",
            "logging.progress_bar=false", "checkpoint.save_interval=0", *attack.overrides]
    run_job(cfg.nproc, args, target, out / "logs" / f"finetune-{target.name}.log",
            script=FINETUNE, what=f"finetune {target.name}")
    losses = train_losses(target)
    return {"final_loss": losses[max(losses)], "steps": max(losses)}


def _asr(result: dict, categories: list[str]) -> float:
    rates = [result["asr"]["greedy"]["none"]["by_category"].get(c) for c in categories]
    rates = [r for r in rates if r is not None]
    return statistics.fmean(rates) if rates else float("nan")


def attack_table(cfg, out: Path) -> list[str]:
    """Markdown: ASR (greedy, no framing) in the targeted and in the other categories, before
    and after each finetuning attack, mean over seeds."""
    if not cfg.finetune_attacks:
        return []
    lines = ["", "## Finetuning attacks", "",
             "ASR % (greedy, no framing), mean over seeds, before -> after the finetune; "
             "'targeted' is the attack's category, 'others' the mean of the other categories.",
             "", "| attack | model | targeted | others | safe queries correct |",
             "|---|---|---|---|---|"]
    for fa in cfg.finetune_attacks:
        targeted = [fa.category] if fa.category else []
        others = [k for k in CATEGORIES if k not in targeted]
        for model in fa.models:
            pairs = []
            for seed in cfg.seeds:
                before = out / "steps" / f"eval-{model}-s{seed}.json"
                after = out / "steps" / f"fteval-{fa.name}-{model}-s{seed}.json"
                if before.exists() and after.exists():
                    pairs.append((json.loads(before.read_text())["result"],
                                  json.loads(after.read_text())["result"]))
            if not pairs:
                continue

            def cell(fn) -> str:
                b = statistics.fmean(fn(p[0]) for p in pairs)
                a = statistics.fmean(fn(p[1]) for p in pairs)
                return f"{100 * b:.1f} -> {100 * a:.1f}"

            tgt = cell(lambda r: _asr(r, targeted)) if targeted else "-"
            lines.append(f"| {fa.name} | {model} | {tgt} | {cell(lambda r: _asr(r, others))} | "
                         f"{cell(lambda r: r['safe']['greedy']['correct'])} |")
    return lines + [""]


def run_finetune_attacks(cfg, out: Path, steps, world: World, base_key: Any,
                         progress: bool, log=print) -> None:
    """The finetuning-attack steps of the experiment (stamped like the others)."""
    from dataclasses import asdict

    from megatron_srp.medsafetyworld.eval import ensure_current_judge, evaluate_model
    from megatron_srp.medsafetyworld.experiment import run_dir

    corpus = [json.loads(x) for x in (out / "corpus.jsonl").read_text().splitlines()]
    for fa in cfg.finetune_attacks:
        data = out / "finetune" / f"{fa.name}.jsonl"

        def write() -> dict:
            records = attack_records(world, corpus, fa, cfg.world_seed)
            data.parent.mkdir(exist_ok=True)
            data.write_text("".join(json.dumps(r) + "\n" for r in records))
            return {"records": len(records)}

        steps.run(f"ftdata-{fa.name}", [base_key, asdict(fa)], write)
        if not data.exists():
            write()
        recipe = Path(fa.recipe).read_text()
        for model in fa.models:
            for seed in cfg.seeds:
                target = out / "finetuned" / f"{fa.name}-{model}-s{seed}"
                key = [base_key, asdict(fa), recipe, model, seed]
                steps.run(f"ft-{fa.name}-{model}-s{seed}", key, lambda: finetune_model(
                    cfg, out, fa, run_dir(out, model, seed), target, data))
                steps.run(f"fteval-{fa.name}-{model}-s{seed}", [key, asdict(cfg.eval)],
                          lambda: evaluate_model(cfg, world, out, target, progress,
                                                 template="chat"))
                ensure_current_judge(world, out, f"fteval-{fa.name}-{model}-s{seed}", log)
