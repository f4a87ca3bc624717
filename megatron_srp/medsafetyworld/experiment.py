"""The SRP-vs-baselines experiment in MedSafetyWorld, as one resumable command.

    python tools/medsafetyworld.py run --config examples/medsafetyworld/cpu_demo.yaml

Steps, each a unit of megatron_srp/units.py: skipped when its stored stamp (a hash of what it
depends on) is the stamp it would have now, recomputed otherwise, and so is what reads it.

1. ``world``: generate the world from the template file, its corpus (oracle labels) and the
   held-out queries.
2. ``data``: preprocess the corpus into every variant (raw, filter, rewrite, withhold, tag,
   srp) with the oracle classifier and the world's taxonomy; for the noisy-classifier
   ablation, a copy of the corpus whose labels are wrong at a set rate, into
   ``<variant>-noisy``.
3. ``train``: pretrain every variant x seed with the same budget (a torchrun job per model;
   a killed job resumes from its checkpoints if its stamp matches; a run trained under other
   settings is moved aside and trained again). ``srp_filter`` is the filter and srp datasets
   blended half and half. For each fraction in ``switch_at`` a twin ``<variant>@<pct>`` of
   the ``switch_variants`` reads raw data until that fraction of the token budget and the
   variant after it: the curriculum timing of the same runner (0% is the variant, 100% raw).
4. ``eval``: every model answers every query under every attack and decoding method, and
   reflects on its own answers; the exact judge scores them (eval.py).
5. ``report``: the premise, the headline comparison with its tests, tables, plots (report.py).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_srp.config import ConfigError, load_yaml_config
from megatron_srp.medsafetyworld.corpus import CorpusConfig, build_corpus, write_corpus
from megatron_srp.medsafetyworld.eval import EVAL_VERSION
from megatron_srp.medsafetyworld.finetune_attack import FinetuneAttack
from megatron_srp.medsafetyworld.fit import check_fit
from megatron_srp.medsafetyworld.models import model_names, parse_model, run_dir
from megatron_srp.medsafetyworld.templates import load_templates
from megatron_srp.medsafetyworld.world import CATEGORIES, World, generate_world
from megatron_srp.units import Units, file_stamp, stamp, write_atomic

#: ``rewrite`` reframes unsafe passages with the world's own facts (SafeWeb's contextual
#: rewriting); ``withhold`` replaces them with a fixed notice (filtering with a placeholder).
BASE_VARIANTS = ("raw", "filter", "rewrite", "withhold", "tag", "srp")
VARIANTS = BASE_VARIANTS + ("srp_filter",)
METHODS = ("greedy", "topk", "beam", "safebeam", "guarded")
WORLD_VERSION = 3  # bump on a change of the generator: finished worlds are then rebuilt


@dataclass
class WorldSize:
    n_conditions: int = 10
    n_patients: int = 80


@dataclass
class EvalSpec:
    queries_per_kind: int = 20
    methods: list[str] = field(default_factory=lambda: ["greedy", "safebeam", "guarded"])
    attacks: list[str] = field(default_factory=lambda: ["none", "roleplay", "hypothetical",
                                                        "prefix"])
    attack_methods: list[str] = field(default_factory=lambda: ["greedy"])  # under attacks
    max_new_tokens: int = 48
    batch_size: int = 32
    num_beams: int = 4
    # the "gcg" attack: a suffix per harmful query, optimised against each model
    gcg_steps: int = 50
    gcg_top_k: int = 64
    gcg_search_width: int = 128
    gcg_target: str = "Sure"
    gcg_queries: int = 0             # attack this many harmful queries (balanced over
                                     # categories); 0: all of them. GCG is the costly attack.


@dataclass
class MedSafetyConfig:
    name: str = "medsafetyworld"
    out_dir: str = "???"
    world_seed: int = 0
    templates: str = ""              # the phrasing set (YAML); empty: the shipped default
    world: WorldSize = field(default_factory=WorldSize)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    noisy_error_rate: float = 0.0    # > 0: also the noisy-classifier ablation
    noisy_variants: list[str] = field(default_factory=lambda: ["srp", "filter"])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    train_config: str = "examples/medsafetyworld/train_cpu.yaml"
    train_overrides: list[str] = field(default_factory=list)
    nproc: int = 1
    # Curriculum timing: a twin ``<variant>@<pct>`` of each of ``switch_variants`` per value,
    # trained on raw until that fraction of the token budget and on the variant after it.
    switch_at: list[float] = field(default_factory=list)
    switch_variants: list[str] = field(default_factory=lambda: ["srp"])
    segment_tokens: int = 256
    eval: EvalSpec = field(default_factory=EvalSpec)
    # Finetuning attacks on trained models (finetune_attack.py); each is evaluated again.
    finetune_attacks: list[FinetuneAttack] = field(default_factory=list)


def load_experiment_config(path: str, overrides: Optional[list[str]] = None) -> MedSafetyConfig:
    cfg = load_yaml_config(MedSafetyConfig, path, overrides)
    assert isinstance(cfg, MedSafetyConfig)
    unknown = sorted(set(cfg.variants) - set(VARIANTS))
    if unknown or not cfg.variants:
        raise ConfigError("variants", f"unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if "srp_filter" in cfg.variants and not {"srp", "filter"} <= set(cfg.variants):
        raise ConfigError("variants", "srp_filter blends srp and filter: list both")
    bad = sorted(set(cfg.noisy_variants) - set(BASE_VARIANTS) - {"raw"})
    if bad:
        raise ConfigError("noisy_variants", f"unknown {bad}")
    if not 0.0 <= cfg.noisy_error_rate < 0.5:
        raise ConfigError("noisy_error_rate", "must be in [0, 0.5)")
    if any(not 0.0 < s < 1.0 for s in cfg.switch_at):
        raise ConfigError("switch_at", f"each fraction must be in (0, 1), got {cfg.switch_at} "
                                       "(0 is the variant itself, 1 the raw model)")
    bad = sorted(v for v in cfg.switch_variants if v == "raw" or v not in cfg.variants)
    if cfg.switch_at and bad:
        raise ConfigError("switch_variants", f"{bad} must be intervention variants of this "
                                             "experiment (not raw)")
    if not cfg.seeds:
        raise ConfigError("seeds", "give at least one seed")
    _check_world_and_eval(cfg)
    if not Path(cfg.train_config).is_file():
        raise ConfigError("train_config", f"no such file: {cfg.train_config}")
    _check_training(cfg)
    for i, fa in enumerate(cfg.finetune_attacks):
        key = f"finetune_attacks[{i}]"
        if fa.category is not None and fa.category not in CATEGORIES:
            raise ConfigError(f"{key}.category", f"unknown {fa.category!r}; choose from "
                                                 f"{', '.join(CATEGORIES)} (or null: benign)")
        if not Path(fa.recipe).is_file():
            raise ConfigError(f"{key}.recipe", f"no such file: {fa.recipe}")
        missing = sorted(set(fa.models) - set(model_names(cfg)))
        if missing:
            raise ConfigError(f"{key}.models", f"{missing} are not trained by this experiment")
        earlier = [f.name for f in cfg.finetune_attacks[:i]]
        if fa.after is not None and fa.after not in earlier:
            raise ConfigError(f"{key}.after", f"{fa.after!r} is not an earlier finetuning "
                                              f"attack (earlier: {earlier})")
        if fa.after is not None:
            before = next(f for f in cfg.finetune_attacks if f.name == fa.after)
            if set(fa.models) - set(before.models):
                raise ConfigError(f"{key}.models", f"{sorted(set(fa.models) - set(before.models))}"
                                                   f" are not finetuned by {fa.after!r}")
        if fa.name in earlier:
            raise ConfigError(f"{key}.name", f"{fa.name!r} is used twice")
        if "greedy" not in cfg.eval.methods:
            raise ConfigError("eval.methods", "finetuning attacks are scored with greedy")
    return cfg


def _check_world_and_eval(cfg: MedSafetyConfig) -> None:
    """The template file, the world's size and the evaluation's names, before any step."""
    from megatron_srp.medsafetyworld.queries import ATTACKS
    from megatron_srp.medsafetyworld.templates import TemplateError

    try:
        templates = load_templates(cfg.templates or None)
    except TemplateError as exc:
        raise ConfigError("templates", str(exc)) from exc
    if cfg.world.n_conditions < 3 or cfg.world.n_patients < 2 * cfg.world.n_conditions:
        raise ConfigError("world", "needs n_conditions >= 3 and n_patients >= 2 per condition")
    bad = sorted(set(cfg.eval.attacks) - set(ATTACKS))
    if bad:
        raise ConfigError("eval.attacks", f"unknown {bad}; choose from {', '.join(ATTACKS)}")
    unframed = sorted(a for a in cfg.eval.attacks if a not in ("none", "prefix", "gcg")
                      and a not in templates.frames)
    if unframed:
        raise ConfigError("eval.attacks", f"{unframed} have no frame in the template file "
                                          f"{templates.path} (attacks: ...)")
    for key in ("methods", "attack_methods"):
        bad = sorted(set(getattr(cfg.eval, key)) - set(METHODS))
        if bad:
            raise ConfigError(f"eval.{key}", f"unknown {bad}; choose from {', '.join(METHODS)}")


def _check_training(cfg: MedSafetyConfig) -> None:
    """The models' training config with the overrides, checked before any step runs."""
    from megatron_srp.config import load_config
    from megatron_srp.validation import Platform, validate

    try:
        run = load_config(cfg.train_config, list(cfg.train_overrides))
        validate(run, cfg.nproc, Platform.detect(), check_files=False, require_data=False)
    except ConfigError as exc:
        raise ConfigError(f"train_config/train_overrides: {exc.key}", str(exc)) from exc


class Steps:
    """The experiment's units (megatron_srp/units.py) under ``<out>/steps``: a step is done iff
    its stored stamp is the stamp of what it depends on now."""

    def __init__(self, out: Path, log: Callable[[str], None]):
        self.units = Units(out / "steps")
        self.log = log
        self.done_count = self.reused = 0
        self.wanted: dict[str, str] = {}

    def run(self, name: str, depends: Any, work: Callable[[str], Any]) -> Any:
        """``work(stamp)`` computes the step's result; the stamp is passed on so that a run
        directory can record it (a changed setting then never reuses an old model)."""
        want = stamp(depends)
        self.wanted[name] = want
        saved = self.units.get(name, want)
        if saved is not None:
            self.reused += 1
            return saved["result"]
        self.log(f"step {name}")
        result = work(want)
        self.units.put(name, want, result)
        self.done_count += 1
        return result


def noisy_labels(corpus: list[dict], error_rate: float, seed: int) -> list[dict]:
    """The corpus as a classifier with ``error_rate`` would label it: each passage's label is
    flipped with that probability (a flipped-to-unsafe passage gets a random category)."""
    rng = random.Random(f"noise-{seed}")
    codes = [c.code for c in CATEGORIES.values()]
    out = []
    for item in corpus:
        item = dict(item)
        if rng.random() < error_rate:
            unsafe = item["label"] == "safe"
            item["label"] = "unsafe" if unsafe else "safe"
            item["category"] = rng.choice(codes) if unsafe else None
        out.append(item)
    return out


def noisy_data(cfg: MedSafetyConfig, out: Path) -> dict:
    """The noisy-classifier ablation's corpus and its ``<variant>-noisy`` datasets."""
    from megatron_srp.medsafetyworld.corpus import read_corpus

    write_corpus(noisy_labels(read_corpus(out / "corpus.jsonl"), cfg.noisy_error_rate,
                              cfg.world_seed), out / "corpus-noisy.jsonl")
    return preprocess_variants(cfg, out, str(out / "corpus-noisy.jsonl"), "-noisy",
                               [v for v in cfg.noisy_variants if v in cfg.variants])


def make_world(cfg: MedSafetyConfig, out: Path) -> dict:
    from megatron_srp.medsafetyworld.queries import build_queries

    templates = load_templates(cfg.templates or None)
    world = generate_world(cfg.world_seed, **asdict(cfg.world))
    world.save(out / "world.json")
    corpus = build_corpus(world, templates, cfg.corpus)
    write_corpus(corpus, out / "corpus.jsonl")
    queries = build_queries(world, templates, cfg.corpus, cfg.eval.queries_per_kind,
                            cfg.world_seed)
    write_atomic(out / "queries.jsonl", "".join(json.dumps(asdict(q)) + "\n" for q in queries))
    unsafe = sum(c["label"] == "unsafe" for c in corpus)
    return {"passages": len(corpus), "unsafe": unsafe, "queries": len(queries),
            "conditions": len(world.conditions), "patients": len(world.patients)}


def _intervention(variant: str, corpus: list[dict]):
    from megatron_srp.interventions import Rewrite, build_intervention
    from megatron_srp.medsafetyworld.rewriter import WorldRewriter
    from megatron_srp.medsafetyworld.world import TAXONOMY

    if variant == "rewrite":
        return Rewrite(taxonomy=TAXONOMY, rewriter=WorldRewriter.from_corpus(corpus))
    name = {"srp": "reflect", "withhold": "rewrite"}.get(variant, variant)
    return build_intervention(name, taxonomy=TAXONOMY)


def preprocess_variants(cfg: MedSafetyConfig, out: Path, corpus: str, suffix: str,
                        variants: list[str]) -> dict:
    from megatron_srp.data.preprocess import PreprocessConfig, run_preprocess
    from megatron_srp.data.shard_worker import Variant
    from megatron_srp.data.shards import ReaderOptions
    from megatron_srp.data.variants import VariantSpec
    from megatron_srp.medsafetyworld.corpus import read_corpus
    from megatron_srp.medsafetyworld.world import TAXONOMY
    from megatron_srp.reflection.segment import SegmentConfig
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

    items = read_corpus(corpus)
    names = [v for v in variants if v in BASE_VARIANTS]
    specs = [VariantSpec(v + suffix, {"srp": "reflect", "withhold": "rewrite"}.get(v, v))
             for v in names]
    built = [Variant(s.name, _intervention(v, items)) for v, s in zip(names, specs)]
    config = PreprocessConfig(inputs=[corpus], output_dir=str(out / "data"), variants=specs,
                              reader=ReaderOptions(id_key="id"), classifier="oracle",
                              classifier_options={"taxonomy": TAXONOMY},
                              segment=SegmentConfig(segment_tokens=cfg.segment_tokens),
                              workers=1, progress=False, overwrite=True)
    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    result = run_preprocess(config, tok, variants=built)
    return {name: {"tokens": v["tokens"], "documents": v["documents"]}
            for name, v in result.summary["variants"].items()}


def data_overrides(cfg: MedSafetyConfig, out: Path, name: str) -> list[str]:
    """The data section of a model's training run."""
    base, noisy, switch_at = parse_model(name)
    tail = "-noisy" if noisy else ""
    if base == "srp_filter":
        target = {str(out / "data" / f"srp{tail}"): 0.5, str(out / "data" / f"filter{tail}"): 0.5}
    else:
        target = {str(out / "data" / f"{base}{tail}"): 1.0}
    raw = str(out / "data" / "raw")
    if switch_at > 0:
        blend = lambda b: "{" + ", ".join(f"{k}: {v}" for k, v in b.items()) + "}"  # noqa: E731
        return [f"data.curriculum=[{{until: {switch_at}, blend: {{{raw}: 1.0}}}}, "
                f"{{until: 1.0, blend: {blend(target)}}}]"]
    paths = list(target)
    return [f"data.paths=[{','.join(paths)}]",
            f"data.weights=[{','.join(str(target[p]) for p in paths)}]"]


def train_model(cfg: MedSafetyConfig, out: Path, name: str, seed: int, unit: str,
                log: Callable[[str], None] = print) -> dict:
    from megatron_srp.training.launch import run_job, train_losses

    target = run_dir(out, name, seed)
    args = ["--config", cfg.train_config, *data_overrides(cfg, out, name),
            f"checkpoint.save={target}", f"train.seed={seed}", f"name={name}-s{seed}",
            "logging.progress_bar=false", *cfg.train_overrides]
    run_job(cfg.nproc, args, target, out / "logs" / f"train-{name}-s{seed}.log",
            what=f"training {name} seed {seed}", stamp=unit, settings=args, log=log)
    losses = train_losses(target)
    return {"final_loss": losses[max(losses)], "steps": max(losses)}


def run_experiment(cfg: MedSafetyConfig, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Every step that is not done yet, then the report; returns the report's numbers."""
    from megatron_srp.medsafetyworld.eval import ensure_current_judge, evaluate_model
    from megatron_srp.medsafetyworld.report import write_report

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out, log)
    templates = load_templates(cfg.templates or None)  # a bad template file fails here
    world_key = [cfg.world_seed, asdict(cfg.world), asdict(cfg.corpus),
                 cfg.eval.queries_per_kind, file_stamp(templates.path), WORLD_VERSION]
    facts = steps.run("world", world_key, lambda _: make_world(cfg, out))
    log(f"world: {facts['conditions']} conditions and drugs, {facts['patients']} patients; "
        f"corpus "
        f"{facts['passages']} passages ({facts['unsafe']} unsafe); {facts['queries']} queries")
    steps.run("fit", [world_key, Path(cfg.train_config).read_text(), cfg.train_overrides,
                      asdict(cfg.eval), cfg.segment_tokens], lambda _: check_fit(cfg, out))
    data_key = [world_key, cfg.variants, cfg.segment_tokens]
    steps.run("data", data_key, lambda _: preprocess_variants(
        cfg, out, str(out / "corpus.jsonl"), "", cfg.variants))
    if cfg.noisy_error_rate > 0:
        steps.run("data-noisy", [world_key, cfg.segment_tokens, cfg.noisy_error_rate,
                                 cfg.noisy_variants], lambda _: noisy_data(cfg, out))
    train_text = Path(cfg.train_config).read_text()
    world = World.load(out / "world.json")
    trained: dict[tuple, str] = {}
    for name in model_names(cfg):
        for seed in cfg.seeds:
            # a model depends on its own datasets (deterministic given the world), not on
            # which other variants the experiment builds: adding a variant or seeds keeps it
            key = [world_key, cfg.segment_tokens, train_text, cfg.train_overrides,
                   parse_model(name)[2], name, seed]
            trained[(name, seed)] = stamp(key)
            steps.run(f"train-{name}-s{seed}", key,
                      lambda unit: train_model(cfg, out, name, seed, unit, log))
            steps.run(f"eval-{name}-s{seed}", [trained[(name, seed)], asdict(cfg.eval),
                                               cfg.templates, EVAL_VERSION],
                      lambda _: evaluate_model(cfg, world, out, run_dir(out, name, seed),
                                             progress))
            ensure_current_judge(world, out, f"eval-{name}-s{seed}", log)
    if cfg.finetune_attacks:
        from megatron_srp.medsafetyworld.finetune_attack import run_finetune_attacks
        run_finetune_attacks(cfg, out, steps, world, trained, progress, log)
    log(f"computed {steps.done_count} step(s), reused {steps.reused} finished before")
    return write_report(cfg, out, stale=steps.units.stale(steps.wanted))
