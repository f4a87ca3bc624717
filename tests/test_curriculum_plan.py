"""Curriculum planning and validation: exact boundaries, exact counts, token matching, and one
test per configuration error (each names its key)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_srp.config import ConfigError, DataConfig, PhaseConfig, load_config
from megatron_srp.data.curriculum_plan import largest_remainder, plan_phases
from megatron_srp.validation import Platform, validate

CPU = Platform(has_cuda=False, capability=None, has_transformer_engine=False)


def _data(*phases: tuple[float, dict], **kw) -> DataConfig:
    return DataConfig(curriculum=[PhaseConfig(until=u, blend=dict(b)) for u, b in phases], **kw)


def test_boundaries_fall_at_the_sample_whose_tokens_reach_the_fraction():
    plans = plan_phases(_data((0.2, {"a": 1}), (0.6, {"a": 1, "b": 1}), (1.0, {"b": 1})), 1000)
    assert [(p.start, p.end) for p in plans] == [(0, 200), (200, 600), (600, 1000)]
    # 0.2 x 999 = 199.8: sample 199 starts at token 199 x S < 0.2 budget, so phase 0 keeps it.
    assert [p.end for p in plan_phases(_data((0.2, {"a": 1}), (1.0, {"b": 1})), 999)] == [200, 999]
    # Exact decimal arithmetic: 0.6 x 5 is 3 (floats say 3.0000000000000004 and would give 4).
    assert [p.end for p in plan_phases(_data((0.6, {"a": 1}), (1.0, {"b": 1})), 5)] == [3, 5]


def test_counts_are_exact_and_sum_to_each_phase():
    assert largest_remainder(10, [1, 3]) == [3, 7]  # 2.5 / 7.5: the tie goes to the first
    assert largest_remainder(7, [1, 1, 1]) == [3, 2, 2]
    plans = plan_phases(_data((0.3, {"safe": 1}), (1.0, {"safe": 0.5, "srp": 0.3, "tag": 0.2})),
                        12_345)
    assert plans[0].counts == {"safe": 3704}
    assert sum(plans[1].counts.values()) == plans[1].size == 12_345 - 3704
    for prefix, weight in (("safe", 0.5), ("srp", 0.3), ("tag", 0.2)):
        assert abs(plans[1].counts[prefix] - weight * plans[1].size) < 1
    zero = plan_phases(_data((1.0, {"a": 1, "b": 0})), 10)
    assert zero[0].counts == {"a": 10}  # a zero weight leaves the dataset out of the phase


def test_plain_blend_is_the_one_phase_case():
    plans = plan_phases(DataConfig(paths=["a", "b"], weights=[1.0, 3.0]), 100)
    assert len(plans) == 1 and plans[0].counts == {"a": 25, "b": 75} and plans[0].until == 1.0
    assert DataConfig(paths=["a", "b"]).prefixes() == ["a", "b"]
    assert _data((0.5, {"x": 1}), (1.0, {"y": 1, "x": 1})).prefixes() == ["x", "y"]


@pytest.mark.parametrize("switch", [0.0, 0.2, 0.6])
def test_match_tokens_holds_intervention_tokens_constant(switch):
    """Interventions switched on after 0%, 20% or 60% of the budget: with match_tokens every
    curriculum draws exactly 10% of the budget from the intervention data."""
    total = 10_007
    mixed = {"safe": 1.0, "reflect": 1.0}
    phases = [(1.0, mixed)] if switch == 0 else [(switch, {"safe": 1.0}), (1.0, mixed)]
    plans = plan_phases(_data(*phases, match_tokens={"reflect": 0.1}), total)
    assert sum(p.counts.get("reflect", 0) for p in plans) == round(0.1 * total)
    assert sum(sum(p.counts.values()) for p in plans) == total
    last = plans[-1]
    assert abs(last.counts["reflect"] / last.size - 0.1 / (1 - switch)) < 1e-3


def _error(data: DataConfig, total: int = 1000) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        plan_phases(data, total)
    return info.value


@pytest.mark.parametrize("data, key, fragment", [
    (_data((0.5, {"a": 1}), (0.5, {"b": 1})), "data.curriculum[1].until",
     "above the previous phase's end (0.5)"),
    (_data((0.7, {"a": 1}), (0.4, {"b": 1})), "data.curriculum[1].until", "above the previous"),
    (_data((1.5, {"a": 1})), "data.curriculum[0].until", "at most 1.0"),
    (_data((0.0, {"a": 1}), (1.0, {"a": 1})), "data.curriculum[0].until", "above the previous"),
    (_data((0.5, {"a": 1}), (0.9, {"b": 1})), "data.curriculum[1].until", "must end at 1.0"),
    (_data((0.5, {}), (1.0, {"b": 1})), "data.curriculum[0].blend", "the blend is empty"),
    (_data((1.0, {"a": -1.0, "b": 2.0})), "data.curriculum[0].blend.a", "non-negative"),
    (_data((1.0, {"a": float("nan")})), "data.curriculum[0].blend.a", "non-negative"),
    (_data((1.0, {"a": 0.0, "b": 0.0})), "data.curriculum[0].blend", "sum to zero"),
    (DataConfig(paths=["a"], curriculum=[PhaseConfig(1.0, {"a": 1})]), "data.curriculum",
     "not both"),
    (DataConfig(), "data.paths", "no dataset given"),
    (DataConfig(paths=["a", "b"], weights=[1.0, -1.0]), "data.weights", "non-negative"),
    (_data((1.0, {"a": 1, "b": 1}), match_tokens={"b": 0.0}), "data.match_tokens.b", "(0, 1]"),
    (_data((1.0, {"a": 1, "b": 1}), match_tokens={"c": 0.1}), "data.match_tokens.c",
     "in no phase's blend"),
    (_data((0.9, {"a": 1}), (1.0, {"a": 1, "b": 1}), match_tokens={"b": 0.2}),
     "data.match_tokens.b", "do not fit in the 100 samples"),
    (_data((1.0, {"a": 1, "b": 1}), match_tokens={"a": 0.6, "b": 0.6}), "data.match_tokens",
     "together need 1200 samples of phase 0, which has 1000"),
    (_data((1.0, {"b": 1}), match_tokens={"b": 0.5}), "data.match_tokens",
     "holds only matched datasets"),
])
def test_every_curriculum_error_names_its_key(data, key, fragment):
    err = _error(data)
    assert err.key == key, str(err)
    assert fragment in str(err), str(err)


def test_a_phase_without_samples_is_refused():
    err = _error(_data((0.01, {"a": 1}), (0.02, {"b": 1}), (1.0, {"a": 1})), total=40)
    assert err.key == "data.curriculum[1].until" and "gets no samples" in str(err)


def test_curriculum_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  curriculum:\n    - {until: 0.6, blend: {d/safe: 1.0}}\n"
                    "    - {until: 1.0, blend: {d/safe: 0.5, d/srp: 0.5}}\n"
                    "  match_tokens: {d/srp: 0.2}\n")
    cfg = load_config(path, ["train.train_iters=20", "train.global_batch_size=8"])
    assert cfg.data.curriculum[1].blend == {"d/safe": 0.5, "d/srp": 0.5}
    validate(cfg, 1, CPU, check_files=False)
    with pytest.raises(ConfigError, match="a list is set whole") as info:
        load_config(path, ["data.curriculum.0.blend.d/safe=heavy"])
    assert info.value.key == "overrides"
    with pytest.raises(ConfigError, match="heavy") as info:
        load_config(path, ["data.curriculum=[{until: 1.0, blend: {d/safe: heavy}}]"])
    assert "blend" in info.value.key
    with pytest.raises(ConfigError) as info:
        validate(load_config(path, ["data.blend_window=0"]), 1, CPU, check_files=False)
    assert info.value.key == "data.blend_window"


def test_dataset_files_tokenizers_and_sequence_length_are_checked(shakespeare_dataset, tmp_path):
    def cfg(*extra):
        return load_config(None, ["train.train_iters=20", "train.global_batch_size=8", *extra])

    other = str(tmp_path / "other")
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(shakespeare_dataset + suffix, other + suffix)
    curriculum = (f"data.curriculum=[{{until: 0.5, blend: {{{shakespeare_dataset}: 1}}}}, "
                  f"{{until: 1.0, blend: {{{other}: 1}}}}]")
    validate(cfg(curriculum), 1, CPU)  # same tokenizer, all files present

    missing = curriculum.replace(other, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="missing.bin does not exist") as info:
        validate(cfg(missing), 1, CPU)
    assert info.value.key.startswith("data.curriculum")

    meta_path = Path(other + ".meta.json")
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"]["fingerprint"] = "0123456789abcdef"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="different tokenizers.*0123456789abcdef") as info:
        validate(cfg(curriculum), 1, CPU)
    assert info.value.key == "data.curriculum"

    meta["tokenizer"]["fingerprint"] = json.loads(
        Path(shakespeare_dataset + ".meta.json").read_text())["tokenizer"]["fingerprint"]
    meta["seq_length"] = 4096
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="built for sequence length 4096"):
        validate(cfg(curriculum, "train.seq_length=256"), 1, CPU)
