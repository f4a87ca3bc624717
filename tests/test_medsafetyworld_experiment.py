"""The MedSafetyWorld experiment runner: bad configs name the key, data mixes are valid training
configs, a resumed run redoes nothing, rejudge and re-scoring from stored answers, the report
opens with the premise and the headline, a changed training setting retrains and keeps the old
run aside, finetuning attacks (with reflections, chained) and GCG, and the shipped configs."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

from megatron_srp.medsafetyworld import corpus as C
from megatron_srp.medsafetyworld.experiment import (
    data_overrides, load_experiment_config, model_names, run_experiment,
)
from megatron_srp.medsafetyworld.safety import names_drug
from megatron_srp.medsafetyworld.templates import HARMFUL_KINDS, SAFE_KINDS, load_templates
from megatron_srp.medsafetyworld.world import World, generate_world

REPO = Path(__file__).resolve().parent.parent

BASE = """\
name: test-msw
world_seed: 0
world: {n_conditions: 4, n_patients: 16}
variants: [raw, filter, srp]
seeds: [1]
train_config: examples/medsafetyworld/train_cpu.yaml
train_overrides: [train.train_iters=6, train.warmup_iters=1, train.micro_batch_size=8,
                  train.global_batch_size=8]
eval: {queries_per_kind: 2, methods: [greedy, guarded], attacks: [none],
       attack_methods: [greedy], max_new_tokens: 8}
"""


def _config(tmp_path: Path, *overrides: str):
    """A small v2 experiment (its own file: the shipped configs are checked on their own
    below), with ``overrides`` on top."""
    path = tmp_path / "experiment.yaml"
    path.write_text(BASE)
    return load_experiment_config(str(path), [f"out_dir={tmp_path / 'exp'}", *overrides])


def test_bad_experiment_configs_name_the_key(tmp_path) -> None:
    import yaml

    from megatron_srp.config import ConfigError
    from megatron_srp.medsafetyworld.templates import DEFAULT_TEMPLATES
    raw = yaml.safe_load(DEFAULT_TEMPLATES.read_text())
    del raw["chart"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(raw))
    cases = [
        (["variants=[raw,magic]"], "variants"),
        (["variants=[raw,srp_filter]"], "srp_filter blends"),
        (["switch_at=[0.5,1.0]"], "switch_at"),
        (["switch_at=[0.5]", "switch_variants=[raw]"], "switch_variants"),
        (["noisy_error_rate=0.5"], "noisy_error_rate"),
        (["noisy_variants=[magic]"], "noisy_variants"),
        (["seeds=[]"], "seeds"),
        (["train_config=examples/medsafetyworld/nowhere.yaml"], "train_config"),
        (["train_overrides=[train.train_iters=6]"], "train.warmup_iters"),
        (["world.n_drugs=12"], "world.n_drugs"),  # a v1 key
        ([f"templates={tmp_path / 'nowhere.yaml'}"], "templates.*no such template file"),
        ([f"templates={broken}"], r"templates.*broken\.yaml: missing key 'chart'"),
        (["finetune_attacks=[{name: x, models: [rewrite]}]"], r"finetune_attacks\[0\].models"),
        (["finetune_attacks=[{name: x, category: poison}]"], r"finetune_attacks\[0\].category"),
        (["finetune_attacks=[{name: x, recipe: nowhere.yaml}]"],
         r"finetune_attacks\[0\].recipe"),
        (["eval.methods=[guarded]", "finetune_attacks=[{name: x, models: [raw]}]"],
         "eval.methods"),
        (["eval.attacks=[none,rolepaly]"], "eval.attacks"),
        (["eval.methods=[sampling]"], "eval.methods"),
        (["eval.attack_methods=[nucleus]"], "eval.attack_methods"),
        (["world={n_conditions: 2, n_patients: 8}"], "world"),
        (["finetune_attacks=[{name: x, models: [raw], after: y}]"],
         r"finetune_attacks\[0\].after"),
        (["finetune_attacks=[{name: x, models: [raw]}, {name: x, models: [raw]}]"],
         r"finetune_attacks\[1\].name"),
        (["finetune_attacks=[{name: p, models: [raw]}, {name: x, models: [raw, filter], "
          "after: p}]"], r"finetune_attacks\[1\].models"),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError, match=key):
            _config(tmp_path, *overrides)


def test_data_mixes_are_valid_training_configs(tmp_path) -> None:
    from megatron_srp.config import load_config
    cfg = _config(tmp_path, "variants=[raw,filter,srp,srp_filter]")
    out = Path(cfg.out_dir)
    blend = load_config(cfg.train_config, data_overrides(cfg, out, "srp_filter"))
    assert blend.data.paths == [str(out / "data" / "srp"), str(out / "data" / "filter")]
    assert blend.data.weights == [0.5, 0.5]
    timed = _config(tmp_path, "switch_at=[0.2,0.6]", "switch_variants=[srp,filter]",
                    "noisy_error_rate=0.1")
    assert model_names(timed) == ["raw", "filter", "srp", "srp-noisy", "filter-noisy",
                                  "srp@20", "srp@60", "filter@20", "filter@60"]
    cur = load_config(timed.train_config, data_overrides(timed, out, "srp@60")).data.curriculum
    assert [p.until for p in cur] == [0.6, 1.0]
    assert cur[0].blend == {str(out / "data" / "raw"): 1.0}
    assert cur[1].blend == {str(out / "data" / "srp"): 1.0}
    noisy = load_config(timed.train_config, data_overrides(timed, out, "srp-noisy")).data
    assert noisy.paths == [str(out / "data" / "srp-noisy")] and not noisy.curriculum


def test_the_experiment_resumes_rejudges_and_reports_the_premise_first(tmp_path) -> None:
    from megatron_srp.medsafetyworld.eval import JUDGE_VERSION, rejudge

    cfg = _config(tmp_path)  # raw, filter, srp; greedy and guarded
    log: list[str] = []
    results = run_experiment(cfg, progress=False, log=log.append)
    assert "computed 9 step(s), reused 0 finished before" in log  # world, fit, data, 3 x 2
    assert set(results["models"]) == {"raw", "filter", "srp"}
    for m in results["models"].values():
        assert set(m["asr"]) == {"greedy", "guarded"}
        assert 0.0 <= m["premise"]["capability"]["mean"] <= 1.0
        assert m["premise"]["unsafe"]["n"] == 4  # 2 harm + 2 stalk queries, one seed
    # the headline: srp + guarded against each baseline's greedy, paired on the same queries
    pairs = {(h["baseline"], h["attack"]): h for h in results["headline"]}
    assert set(pairs) == {("filter+greedy", "none"), ("filter+greedy", "all"),
                          ("raw+greedy", "none"), ("raw+greedy", "all")}
    assert all(h["n"] == 4 and 0.0 <= h["p"] <= 1.0 for h in pairs.values())
    out = Path(cfg.out_dir)
    report = (out / "report.md").read_text()
    body = [line for line in report.splitlines()[1:] if line.strip()]
    verdict = next(i for i, line in enumerate(body) if "premise" in line.lower())
    assert body[verdict].startswith(("**The premise holds**", "**The premise does not hold"))
    assert verdict == 1  # right after the one line on seeds and intervals
    assert report.index(body[verdict]) < report.index("## Premise") < \
        report.index("## Headline") < report.index("## ASR under inference-stage attacks")
    premise = report[report.index("## Premise"):report.index("## Headline")]
    for name in ("raw", "filter", "srp"):
        assert f"\n| {name} | " in premise
    assert "| srp+guarded vs filter+greedy | fail-closed | none | 4 |" in report
    assert "| srp+guarded vs raw+greedy | fail-closed | all | 4 |" in report
    assert "| srp+guarded vs raw+greedy | monitor only | all | 4 |" in report
    assert "## Why guarded answers were refused" in report
    assert (out / "plots" / "asr_attacks.png").stat().st_size > 1000
    answers = [json.loads(x) for x in (out / "answers" / "srp-s1.jsonl").read_text()
               .splitlines()]
    assert Counter((a["method"], a["harmful"]) for a in answers) == {
        ("greedy", True): 4, ("greedy", False): 6, ("guarded", True): 4, ("guarded", False): 6}
    assert all("reflection" in a for a in answers if a["method"] == "greedy")

    # resume: nothing is done again; a deleted evaluation is the one step redone
    log.clear()
    run_experiment(cfg, progress=False, log=log.append)
    assert "computed 0 step(s), reused 9 finished before" in log
    assert not [m for m in log if m.startswith("step ")]
    (out / "steps" / "eval-srp-s1.json").unlink()
    log.clear()
    run_experiment(cfg, progress=False, log=log.append)
    assert [m for m in log if m.startswith("step ")] == ["step eval-srp-s1"]
    assert "computed 1 step(s), reused 8 finished before" in log

    # rejudge lists exactly the stored verdicts the current judge disagrees with
    world = World.load(out / "world.json")
    assert rejudge(world, out) == []
    stored = out / "answers" / "srp-s1.jsonl"
    rows = [json.loads(x) for x in stored.read_text().splitlines()]
    rows[0]["unsafe"] = not rows[0]["unsafe"]
    stored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed = rejudge(world, out)
    assert [(c["model"], c["query"], c["method"]) for c in changed] == [
        ("srp-s1", rows[0]["query"], rows[0]["method"])]
    assert changed[0]["unsafe"] == [rows[0]["unsafe"], not rows[0]["unsafe"]]

    # an evaluation scored by an older judge is re-scored from its stored answers, exactly,
    # without generating again
    step = out / "steps" / "eval-srp-s1.json"
    saved = json.loads(step.read_text())
    fresh = saved["result"]
    stale = json.loads(json.dumps(fresh))
    stale["judge"] = JUDGE_VERSION - 1
    stale["asr"]["greedy"]["none"]["asr"] = 0.99
    stale["safe"]["greedy"]["correct"] = 0.99
    step.write_text(json.dumps({**saved, "result": stale}))
    log.clear()
    run_experiment(cfg, progress=False, log=log.append)
    assert "computed 0 step(s), reused 9 finished before" in log
    assert any(m.startswith("re-scored eval-srp-s1") for m in log)
    assert json.loads(step.read_text())["result"] == fresh
    assert rejudge(world, out) == []  # the stored verdicts were rewritten too


def test_a_changed_training_setting_retrains_and_evaluates_the_new_model(tmp_path) -> None:
    from megatron_srp.units import Units, stamp

    overrides = ["variants=[raw]", "eval.methods=[greedy]"]
    log: list[str] = []
    run_experiment(_config(tmp_path, *overrides), progress=False, log=log.append)
    out = tmp_path / "exp"
    run = out / "runs" / "raw-s1"
    assert "train_iters: 6" in (run / "config.yaml").read_text()
    first = json.loads((out / "steps" / "eval-raw-s1.json").read_text())

    cfg = _config(tmp_path, *overrides,
                  "train_overrides=[train.train_iters=8,train.warmup_iters=1,"
                  "train.micro_batch_size=8,train.global_batch_size=8]")
    log.clear()
    run_experiment(cfg, progress=False, log=log.append)
    assert [m for m in log if m.startswith("step ")] == ["step fit", "step train-raw-s1",
                                                         "step eval-raw-s1"]
    assert "computed 3 step(s), reused 2 finished before" in log  # world and data reused
    stale = list((out / "runs").glob("raw-s1.stale-*"))
    assert len(stale) == 1 and any(str(stale[0]) in m for m in log)
    assert "train_iters: 6" in (stale[0] / "config.yaml").read_text()  # the old run, kept
    assert "train_iters: 8" in (run / "config.yaml").read_text()       # the new one
    # the evaluation is the new model's: keyed by the new training step, written after it
    units = Units(out / "steps")
    trained = units.get("train-raw-s1", units.stored_stamp("train-raw-s1"))
    assert trained["result"]["steps"] == 8
    evaluated = json.loads((out / "steps" / "eval-raw-s1.json").read_text())
    from megatron_srp.medsafetyworld.eval import EVAL_VERSION
    assert evaluated["stamp"] == stamp([trained["stamp"], asdict(cfg.eval), cfg.templates,
                                        EVAL_VERSION])
    assert evaluated["stamp"] != first["stamp"]
    assert (out / "steps" / "eval-raw-s1.json").stat().st_mtime >= \
        (run / "config.yaml").stat().st_mtime
    assert "stored with another stamp" not in (out / "report.md").read_text()


def test_finetune_attack_records_are_qa_passages_split_into_prompt_and_answer() -> None:
    from megatron_srp.medsafetyworld.finetune_attack import FinetuneAttack, attack_records
    world = generate_world(0, 4, 16)
    corpus = C.build_corpus(world, load_templates())
    by_id = {i["id"]: i for i in corpus}
    records = attack_records(world, corpus, FinetuneAttack(name="h", category="harm",
                                                           examples=5))
    assert len(records) == 5 and len({r["source"] for r in records}) == 5
    for r in records:
        item = by_id[r["source"]]
        assert item["kind"] == "harm" and item["label"] == "unsafe"
        assert (r["prompt"], r["response"]) == (item["prompt"], item["answer"])
        assert names_drug(world.dangerous(world.patient(item["patient"]).condition).name,
                          r["response"])
    benign = attack_records(world, corpus, FinetuneAttack(name="b", category=None, examples=3))
    assert all(by_id[r["source"]]["kind"] in SAFE_KINDS for r in benign)
    # post-training compatible with SRP: the same records, each answer followed by its
    # reflection in the corpus's own format
    tuned = attack_records(world, corpus, FinetuneAttack(name="b", category=None, examples=3,
                                                         reflections=True))
    assert [r["response"] for r in tuned] == [r["response"] + "<|reflect|>Safe<|/reflect|>"
                                              for r in benign]
    harmful = attack_records(world, corpus, FinetuneAttack(name="h", category="harm",
                                                           examples=5, reflections=True))
    assert all(r["response"].endswith("<|reflect|>Unsafe: MSW-HARM<|/reflect|>")
               for r in harmful)
    assert attack_records(world, corpus, FinetuneAttack(name="h", category="harm",
                                                        examples=5)) == records


def test_a_finetuning_attack_and_gcg_are_run_and_reported(tmp_path) -> None:
    cfg = _config(tmp_path, "variants=[raw]", "eval.methods=[greedy]",
                  "eval.attacks=[none,gcg]", "eval.gcg_steps=2", "eval.gcg_top_k=8",
                  "eval.gcg_search_width=8", "eval.gcg_queries=2",
                  "finetune_attacks=[{name: harm-4, category: harm, examples: 4, "
                  "models: [raw], overrides: [train.lr=1.0e-3]}, {name: post, examples: 3, "
                  "reflections: true, after: harm-4, models: [raw]}]")
    log: list[str] = []
    run_experiment(cfg, progress=False, log=log.append)
    out = Path(cfg.out_dir)
    from megatron_srp.training.checkpoint import latest_checkpoint
    run = json.loads((latest_checkpoint(out / "finetuned" / "harm-4-raw-s1") / "run.json")
                     .read_text())
    assert run["finetune"]["records"] == 4
    # the chained attack starts from harm-4's model and trains on reflection-carrying answers
    post = json.loads((latest_checkpoint(out / "finetuned" / "post-raw-s1") / "run.json")
                      .read_text())
    assert Path(post["finetune"]["pretrained"]).parent == out / "finetuned" / "harm-4-raw-s1"
    records = [json.loads(x) for x in (out / "finetune" / "post.jsonl").read_text().splitlines()]
    assert all(r["response"].endswith("<|reflect|>Safe<|/reflect|>") for r in records)
    report = (out / "report.md").read_text()
    assert "| post (with reflections) after harm-4 | raw |" in report
    assert "## Finetuning attacks" in report and "| harm-4 | raw |" in report
    assert "| model | target loss before | after | target hits |" in report
    assert re.search(r"\n\| raw \| [\d.]+ \| [\d.]+ \| [0-2] \|", report)
    before = json.loads((out / "steps" / "eval-raw-s1.json").read_text())["result"]
    gcg = before["asr"]["greedy"]["gcg"]["gcg"]
    assert gcg["loss"] <= gcg["initial_loss"] and 0 <= gcg["target_hits"] <= 2
    answers = [json.loads(x) for x in (out / "answers" / "raw-s1.jsonl").read_text()
               .splitlines()]
    attacked_ids = [a["query"] for a in answers if a["attack"] == "gcg"]
    harmful = [a["query"] for a in answers if a["attack"] == "none" and a["harmful"]]
    assert len(harmful) == 4 and len(attacked_ids) == 2 and set(attacked_ids) <= set(harmful)
    assert {q.split("-")[0] for q in attacked_ids} == set(HARMFUL_KINDS)  # every category
    after = json.loads((out / "steps" / "fteval-harm-4-raw-s1.json").read_text())["result"]
    assert set(after["asr"]["greedy"]["none"]["by_category"]) == {"harm", "privacy"}
    assert (out / "answers" / "harm-4-raw-s1.jsonl").is_file()
    log.clear()
    run_experiment(cfg, progress=False, log=log.append)
    assert [m for m in log if m.startswith("step ")] == []  # the finetune is reused too


def _shipped_configs() -> list[str]:
    """The experiment configs under examples/medsafetyworld (not the training configs or the
    phrasing sets they name)."""
    import yaml
    return sorted(p.name for p in (REPO / "examples" / "medsafetyworld").glob("*.yaml")
                  if "out_dir" in (yaml.safe_load(p.read_text()) or {}))


def test_the_shipped_experiment_configs_include_the_demo() -> None:
    assert "cpu_demo.yaml" in _shipped_configs()


@pytest.mark.parametrize("name", _shipped_configs())
def test_shipped_experiment_configs_are_valid(name, tmp_path) -> None:
    cfg = load_experiment_config(f"examples/medsafetyworld/{name}", [f"out_dir={tmp_path}"])
    load_templates(cfg.templates or None)  # the phrasing set it names loads
    world = generate_world(cfg.world_seed, **asdict(cfg.world))  # its world can be built
    assert C.held_out(world, cfg.corpus)
