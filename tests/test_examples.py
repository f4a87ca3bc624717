"""Every shipped example config loads and validates: the examples/ configs at their smallest
world size (DP=1), the examples/scale/ configs at the GPU count and layout their header states."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_srp.config import load_config
from megatron_srp.validation import Platform, validate

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))
H100 = Platform(has_cuda=True, capability=(9, 0), has_transformer_engine=True)
CPU = Platform(has_cuda=False, capability=None, has_transformer_engine=False)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_is_valid(path):
    cfg = load_config(path)
    world = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    platform = CPU if "cpu" in path.stem else H100
    validate(cfg, world, platform, check_files=False)


def test_examples_exist():
    assert len(EXAMPLES) >= 4


CURRICULA = sorted(p for p in (EXAMPLES[0].parent / "curriculum").glob("*.yaml")
                   if p.stem not in ("base",) and not p.stem.endswith("_common"))


@pytest.mark.parametrize("path", CURRICULA, ids=[p.stem for p in CURRICULA])
def test_curriculum_recipe_is_valid(path):
    cfg = load_config(path)
    assert cfg.model.preset == "smollm2-135m" and cfg.data.curriculum  # from base.yaml + own
    validate(cfg, 1, H100, check_files=False)


@pytest.mark.parametrize("intervention_set", ["all_tags", "rewrite_refusal"])
def test_switch_recipes_see_the_same_intervention_tokens(intervention_set):
    """The 0/20/60% recipes of a set: the switch where the file name says, and the same
    number of samples from every intervention dataset (match_tokens)."""
    from megatron_srp.data.curriculum_plan import plan_phases

    totals = []
    for pct in (0, 20, 60):
        cfg = load_config(EXAMPLES[0].parent / "curriculum" / f"{intervention_set}_{pct}.yaml")
        n = cfg.train.train_iters * cfg.train.global_batch_size
        plans = plan_phases(cfg.data, n)
        assert plans[-1].start == round(pct / 100 * n)
        assert set(plans[0].counts) == ({"data/corpus/filter"} if pct else set(
            cfg.data.match_tokens) | {"data/corpus/filter"})
        totals.append({p: sum(plan.counts.get(p, 0) for plan in plans)
                       for p in cfg.data.match_tokens})
    assert totals[0] == totals[1] == totals[2] and all(totals[0].values())


def test_recipes_inherit_from_their_base(tmp_path):
    from megatron_srp.config import ConfigError

    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {lr: 0.5}\n")
    (tmp_path / "b.yaml").write_text("base: c.yaml\ntrain: {lr: 0.1, min_lr: 0.01}\n")
    (tmp_path / "c.yaml").write_text("name: from-c\ntrain: {min_lr: 0.02, seed: 9}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.name, cfg.train.lr, cfg.train.min_lr, cfg.train.seed) == ("from-c", 0.5, 0.01, 9)
    (tmp_path / "c.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="no such file: .*nowhere.yaml"):
        load_config(tmp_path / "a.yaml")


def test_evaluation_examples_load() -> None:
    from megatron_srp.evaluation.suite import load_eval_config

    for path in sorted((EXAMPLES[0].parent / "eval").glob("*.yaml")):
        cfg = load_eval_config(path)
        assert cfg.checkpoints and cfg.data.labels, path


SCALE = sorted((EXAMPLES[0].parent / "scale").glob("*.yaml"))
_LAYOUT = re.compile(r"^# (\S+) on (\d+) GPUs \((\d+) nodes? x 8\): "
                     r"TP=(\d+)(?: \(sequence parallel\))? x PP=(\d+)(?: \((\d+) virtual stages\))?"
                     r" x DP=(\d+)$")


@pytest.mark.parametrize("path", SCALE, ids=[p.stem for p in SCALE])
def test_scale_config_is_valid_at_its_world_size(path):
    """Each scale-out config validates on H100s at the GPU count its header states, and the
    header's nodes and TP / PP / DP are the config's (DP = world / (TP x PP), TP within a node)."""
    from megatron_srp.validation import data_parallel_size

    lines = path.read_text().splitlines()
    m = _LAYOUT.match(lines[0])
    assert m, f"{path.name}: first line does not state the layout: {lines[0]!r}"
    preset, gpus, nodes, tp, pp, vpp, dp = m.groups()
    cfg = load_config(path)
    stated = [float(x.split()[5]) for x in lines if x.startswith("# estimated memory per GPU:")]
    from megatron_srp.training.memory import GIB, plan_memory
    estimate = plan_memory(cfg, int(gpus)).total / GIB
    assert stated and abs(stated[0] - estimate) < 0.05, (stated, estimate)  # header is current
    assert estimate < 70  # fits an 80 GB GPU with the estimator's margin
    p = cfg.parallel
    validate(cfg, int(gpus), H100, check_files=False)
    assert (cfg.model.preset, int(gpus), p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size,
            data_parallel_size(cfg, int(gpus))) == (
        preset, int(nodes) * 8, int(tp), int(pp), int(vpp) if vpp else None, int(dp))
    assert p.tensor_model_parallel_size <= 8 and cfg.train.precision == "bf16"
    sp_stated = "sequence parallel" in lines[0]
    assert p.sequence_parallel == (p.tensor_model_parallel_size > 1) == sp_stated


def test_scale_configs_cover_the_planned_sizes():
    planned = {("smollm2-1.7b", 8), ("llama-7b", 8), ("llama-7b", 64), ("llama-70b", 64),
               ("llama-70b", 256), ("llama-70b", 512)}
    found = {(m.group(1), int(m.group(2))) for m in
             (_LAYOUT.match(p.read_text().splitlines()[0]) for p in SCALE) if m}
    assert found == planned
