"""Config loading and validation: every rejection rule, one test each, no processes or models.

Each rejection test asserts the offending key (``ConfigError.key``) and a fragment of the
message that tells the user what is wrong. Configs are built with ``load_config(None, [...])``
from a base that validates (see ``test_base_config_is_valid``), so each case breaks one rule.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_srp.config import (CheckpointConfig, ConfigError, DataConfig, ExperimentConfig,
                                 ModelConfig, ParallelConfig, TrainConfig, load_config)
from megatron_srp.validation import Platform, resolved_precision, validate

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CPU_YAML = REPO_ROOT / "examples" / "tiny_cpu.yaml"

CPU = Platform(has_cuda=False, capability=None, has_transformer_engine=False)
A100_TE = Platform(has_cuda=True, capability=(8, 0), has_transformer_engine=True)
H100_NO_TE = Platform(has_cuda=True, capability=(9, 0), has_transformer_engine=False)
H100_TE = Platform(has_cuda=True, capability=(9, 0), has_transformer_engine=True)

# Tiny preset: 4 layers, hidden 128, ffn 384, 4 heads, 2 query groups, max positions 1024.
# Defaults: micro batch 4, global batch 8, seq 256, train_iters 100, warmup 10.
BASE = ["data.paths=[ds]"]


def make(*overrides: str, base: list[str] = BASE) -> ExperimentConfig:
    return load_config(None, [*base, *overrides])


def assert_config_error(exc_info: pytest.ExceptionInfo, key: str, fragment: str) -> None:
    err = exc_info.value
    assert err.key == key, f"expected key {key!r}, got {err.key!r}: {err}"
    assert str(err).startswith(f"config error at '{key}': "), str(err)
    assert fragment in str(err), f"{fragment!r} not in {str(err)!r}"


def touch_dataset(prefix: Path, exts: tuple[str, ...] = (".bin", ".idx")) -> str:
    for ext in exts:
        Path(str(prefix) + ext).touch()
    return str(prefix)


# --------------------------------------------------------------------------- load_config


def test_defaults_load_without_file_or_overrides():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert cfg == ExperimentConfig()


def test_unknown_nested_key_rejected():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.bogus=1"])
    assert_config_error(exc, "train.bogus", "Key 'bogus' not in 'TrainConfig'")


def test_unknown_top_level_section_rejected():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["bogus.x=1"])
    assert_config_error(exc, "bogus", "Key 'bogus' not in 'ExperimentConfig'")


def test_int_key_given_a_word_rejected():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.train_iters=abc"])
    assert_config_error(exc, "train.train_iters", "'abc'")
    assert "Integer" in str(exc.value)


def test_bool_key_given_a_word_rejected():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["parallel.sequence_parallel=maybe"])
    assert_config_error(exc, "parallel.sequence_parallel", "'maybe' is not a valid bool")


def test_list_key_given_a_scalar_rejected():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["data.paths=notalist"])
    assert_config_error(exc, "data.paths", "not a ListConfig")


def test_override_without_equals_rejected():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.train_iters"])
    assert_config_error(exc, "train.train_iters", "must look like key=value")


def test_missing_yaml_file_rejected(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert_config_error(exc, "--config", f"no such file: {path}")


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [1,\n  train_iters: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert_config_error(exc, "--config", f"cannot parse {path}")
    assert "line" in str(exc.value)  # the yaml position is kept


def test_yaml_unknown_key_rejected(tmp_path):
    path = tmp_path / "unknown.yaml"
    path.write_text("train:\n  lr: 0.1\n  learning_rate: 0.2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert_config_error(exc, "train.learning_rate", "not in 'TrainConfig'")


def test_yaml_wrong_type_rejected(tmp_path):
    path = tmp_path / "wrong_type.yaml"
    path.write_text("parallel:\n  tensor_model_parallel_size: two\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert_config_error(exc, "parallel.tensor_model_parallel_size", "'two'")


def test_yaml_and_overrides_merge_override_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "name: merged\n"
        "model:\n  preset: smollm2-135m\n  num_layers: 6\n"
        "train:\n  train_iters: 20\n  lr: 0.01\n  seq_length: 128\n"
        "data:\n  paths: [a/b, c/d]\n  weights: [1, 3]\n"
    )
    cfg = load_config(path, ["train.train_iters=50", "parallel.tensor_model_parallel_size=2",
                             "parallel.sequence_parallel=true", "train.min_lr=1e-4",
                             "model.num_layers=null"])
    assert isinstance(cfg, ExperimentConfig)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.train, TrainConfig)
    assert isinstance(cfg.parallel, ParallelConfig) and isinstance(cfg.data, DataConfig)
    assert isinstance(cfg.checkpoint, CheckpointConfig)
    # the override beats the YAML, the YAML beats the default
    assert cfg.train.train_iters == 50 and type(cfg.train.train_iters) is int
    assert cfg.train.lr == 0.01 and type(cfg.train.lr) is float
    assert cfg.train.min_lr == 1e-4 and type(cfg.train.min_lr) is float
    assert cfg.train.seq_length == 128
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.parallel.sequence_parallel is True
    assert cfg.model.num_layers is None  # `null` resets an optional key
    assert cfg.name == "merged" and cfg.model.preset == "smollm2-135m"
    assert cfg.data.paths == ["a/b", "c/d"]
    assert cfg.data.weights == [1.0, 3.0] and all(type(w) is float for w in cfg.data.weights)
    # untouched keys keep the dataclass defaults
    assert cfg.train.micro_batch_size == TrainConfig().micro_batch_size
    assert cfg.checkpoint == CheckpointConfig()


# --------------------------------------------------------------------------- validate: controls


def test_base_config_is_valid():
    validate(make(), world_size=1, platform=CPU, check_files=False)


@pytest.mark.parametrize("world_size", [1, 2])
def test_shipped_tiny_cpu_example_validates(world_size):
    cfg = load_config(TINY_CPU_YAML)
    assert cfg.model.preset == "tiny"
    validate(cfg, world_size=world_size, platform=CPU, check_files=False)


def test_fp8_accepted_on_hopper_with_transformer_engine():
    validate(make("train.precision=fp8", "train.fp8_recipe=tensorwise", "model.layer_spec=te"),
             world_size=1, platform=H100_TE, check_files=False)


def test_existing_dataset_files_accepted(tmp_path):
    a, b = touch_dataset(tmp_path / "a"), touch_dataset(tmp_path / "b")
    (tmp_path / "ckpt").mkdir()
    cfg = make(f"data.paths=['{a}', '{b}']", "data.weights=[0.3, 0.7]",
               f"checkpoint.load={tmp_path / 'ckpt'}", base=[])
    validate(cfg, world_size=1, platform=CPU, check_files=True)


def test_resolved_precision_auto_is_fp32_on_cpu_and_bf16_on_gpu():
    cfg = make()
    assert cfg.train.precision == "auto"
    assert resolved_precision(cfg, CPU) == "fp32"
    assert resolved_precision(cfg, A100_TE) == "bf16"
    assert resolved_precision(cfg, H100_NO_TE) == "bf16"
    assert resolved_precision(make("train.precision=fp32"), H100_TE) == "fp32"


# --------------------------------------------------------------------------- validate: rejections

# (id, overrides on top of BASE, world_size, platform, key, message fragment); check_files=False
TP = "parallel.tensor_model_parallel_size"
PP = "parallel.pipeline_model_parallel_size"
VPP = "parallel.virtual_pipeline_model_parallel_size"
REJECTIONS = [
    ("heads_not_divisible_by_tp", [f"{TP}=8"], 8, CPU,
     TP, "num_attention_heads 4 is not divisible by TP=8"),
    ("query_groups_not_divisible_by_tp", [f"{TP}=4"], 4, CPU,
     TP, "num_query_groups 2 is not divisible by TP=4"),
    ("ffn_not_divisible_by_tp", [f"{TP}=2", "model.ffn_hidden_size=385"], 2, CPU,
     TP, "ffn_hidden_size 385 is not divisible by TP=2"),
    ("hidden_not_divisible_by_heads", ["model.hidden_size=130"], 1, CPU,
     "model.hidden_size", "130 is not divisible by num_attention_heads 4"),
    ("heads_not_divisible_by_query_groups", ["model.num_query_groups=3"], 1, CPU,
     "model.num_query_groups", "num_attention_heads 4 is not divisible by num_query_groups 3"),
    ("layers_not_divisible_by_pp", [f"{PP}=3"], 3, CPU,
     "model.num_layers", "4 layers do not split into PP=3 x virtual stages=1"),
    ("layers_not_divisible_by_pp_times_vpp", [f"{PP}=2", f"{VPP}=4"], 2, CPU,
     "model.num_layers", "4 layers do not split into PP=2 x virtual stages=4"),
    ("vpp_without_pp", [f"{VPP}=2"], 1, CPU,
     VPP, "need pipeline_model_parallel_size > 1"),
    ("vpp_below_one", [f"{PP}=2", f"{VPP}=0"], 2, CPU,
     VPP, "must be >= 1"),
    ("world_size_not_divisible_by_tp_pp", [f"{TP}=2"], 3, CPU,
     "parallel", "world size 3 is not divisible by TP x PP = 2"),
    ("global_batch_not_divisible_by_micro_times_dp", [], 4, CPU,
     "train.global_batch_size", "8 is not divisible by micro_batch_size x DP = 4 x 4"),
    ("interleaved_microbatches_not_multiple_of_pp",
     [f"{PP}=2", f"{VPP}=2", "train.global_batch_size=4"], 2, CPU,
     "train.global_batch_size", "number of microbatches (1) to be a multiple of PP=2"),
    ("sequence_parallel_without_tp", ["parallel.sequence_parallel=true"], 1, CPU,
     "parallel.sequence_parallel", "needs tensor_model_parallel_size > 1"),
    ("sequence_parallel_seq_length_not_divisible_by_tp",
     [f"{TP}=2", "parallel.sequence_parallel=true", "train.seq_length=255"], 2, CPU,
     "train.seq_length", "255 is not divisible by TP=2 (sequence parallel)"),
    ("seq_length_above_max_positions", ["train.seq_length=2048"], 1, CPU,
     "train.seq_length", "2048 exceeds the preset's max_position_embeddings 1024"),
    ("min_lr_above_lr", ["train.lr=1e-4", "train.min_lr=1e-3"], 1, CPU,
     "train.min_lr", "must be in [0, lr=0.0001], got 0.001"),
    ("warmup_not_below_train_iters", ["train.warmup_iters=100"], 1, CPU,
     "train.warmup_iters", "below the decay length (100 iterations), got 100"),
    ("warmup_not_below_lr_decay_iters", ["train.warmup_iters=60", "train.lr_decay_iters=50"],
     1, CPU, "train.warmup_iters", "below the decay length (50 iterations), got 60"),
    ("unknown_preset", ["model.preset=gpt5"], 1, CPU,
     "model.preset", "unknown preset 'gpt5'; known: tiny, smollm2-135m"),
    ("bad_precision", ["train.precision=fp16"], 1, CPU,
     "train.precision", "'fp16' is not one of auto, fp32, bf16, fp8"),
    ("bad_fp8_recipe", ["train.fp8_recipe=mxfp8"], 1, CPU,
     "train.fp8_recipe", "'mxfp8' is not one of delayed, tensorwise"),
    ("bad_recompute", ["model.recompute=some"], 1, CPU,
     "model.recompute", "'some' is not one of none, selective, full"),
    ("bad_layer_spec", ["model.layer_spec=apex"], 1, CPU,
     "model.layer_spec", "'apex' is not one of auto, local, te"),
    ("bad_optimizer_format", ["checkpoint.optimizer_format=torch_dist"], 1, CPU,
     "checkpoint.optimizer_format", "'torch_dist' is not one of fully_reshardable, dp_reshardable"),
    ("bf16_on_cpu", ["train.precision=bf16"], 1, CPU,
     "train.precision", "bf16 needs a CUDA GPU"),
    ("fp8_on_cpu", ["train.precision=fp8"], 1, CPU,
     "train.precision", "fp8 needs a CUDA GPU"),
    ("fp8_without_transformer_engine", ["train.precision=fp8"], 1, H100_NO_TE,
     "train.precision", "fp8 needs Transformer Engine"),
    ("fp8_on_ampere", ["train.precision=fp8"], 1, A100_TE,
     "train.precision", "fp8 needs a Hopper (sm_90) or newer GPU; this one is sm_80"),
    ("te_layer_spec_without_transformer_engine", ["model.layer_spec=te"], 1, H100_NO_TE,
     "model.layer_spec", "'te' needs Transformer Engine and a CUDA GPU"),
    ("te_layer_spec_on_cpu", ["model.layer_spec=te"], 1, CPU,
     "model.layer_spec", "'te' needs Transformer Engine and a CUDA GPU"),
    ("micro_batch_size_zero", ["train.micro_batch_size=0"], 1, CPU,
     "train.micro_batch_size", "must be >= 1, got 0"),
    ("global_batch_size_zero", ["train.global_batch_size=0"], 1, CPU,
     "train.global_batch_size", "must be >= 1, got 0"),
    ("tp_zero", [f"{TP}=0"], 1, CPU, TP, "must be >= 1, got 0"),
    ("train_iters_zero", ["train.train_iters=0"], 1, CPU,
     "train.train_iters", "must be >= 1, got 0"),
    ("log_interval_zero", ["logging.log_interval=0"], 1, CPU,
     "logging.log_interval", "must be >= 1, got 0"),
    ("zero_attention_heads", ["model.num_attention_heads=0"], 1, CPU,
     "model.num_attention_heads", "must be >= 1, got 0"),
    ("zero_query_groups", ["model.num_query_groups=0"], 1, CPU,
     "model.num_query_groups", "must be >= 1, got 0"),
    ("zero_layers", ["model.num_layers=0"], 1, CPU,
     "model.num_layers", "must be >= 1, got 0"),
    ("negative_ffn", ["model.ffn_hidden_size=-4"], 1, CPU,
     "model.ffn_hidden_size", "must be >= 1, got -4"),
    ("keep_last_zero", ["checkpoint.keep_last=0"], 1, CPU,
     "checkpoint.keep_last", "must be >= 1"),
    ("save_interval_negative", ["checkpoint.save_interval=-1"], 1, CPU,
     "checkpoint.save_interval", "must be >= 0"),
    ("no_data_paths", ["data.paths=[]"], 1, CPU,
     "data.paths", "no dataset given"),
    ("weights_length_mismatch", ["data.paths=[a,b]", "data.weights=[1.0]"], 1, CPU,
     "data.weights", "1 weights for 2 paths"),
    ("negative_weights", ["data.paths=[a,b]", "data.weights=[1,-1]"], 1, CPU,
     "data.weights", "weights must be non-negative"),
    ("zero_sum_weights", ["data.paths=[a,b]", "data.weights=[0,0]"], 1, CPU,
     "data.weights", "weights sum to zero"),
    ("split_with_two_parts", ["data.split='95,5'"], 1, CPU,
     "data.split", "'95,5' is not three comma-separated numbers"),
    ("split_not_numbers", ["data.split='a,b,c'"], 1, CPU,
     "data.split", "'a,b,c' is not three comma-separated numbers"),
    ("split_sums_to_zero", ["data.split='0,0,0'"], 1, CPU,
     "data.split", "the split sums to zero"),
]


@pytest.mark.parametrize("overrides,world_size,platform,key,fragment",
                         [case[1:] for case in REJECTIONS], ids=[case[0] for case in REJECTIONS])
def test_validate_rejects(overrides, world_size, platform, key, fragment):
    cfg = make(*overrides)
    with pytest.raises(ConfigError) as exc:
        validate(cfg, world_size=world_size, platform=platform, check_files=False)
    assert_config_error(exc, key, fragment)


def test_the_no_data_rule_applies_to_the_bare_defaults():
    with pytest.raises(ConfigError) as exc:
        validate(load_config(), world_size=1, platform=CPU, check_files=False)
    assert_config_error(exc, "data.paths", "no dataset given")


def test_missing_bin_file_named(tmp_path):
    ok = touch_dataset(tmp_path / "ok")
    half = touch_dataset(tmp_path / "half", exts=(".idx",))
    cfg = make(f"data.paths=['{ok}', '{half}']", base=[])
    with pytest.raises(ConfigError) as exc:
        validate(cfg, world_size=1, platform=CPU, check_files=True)
    assert_config_error(exc, "data.paths[1]", f"{half}.bin does not exist")
    assert "preprocess_srp.py" in str(exc.value)


def test_missing_idx_file_named(tmp_path):
    prefix = touch_dataset(tmp_path / "noidx", exts=(".bin",))
    with pytest.raises(ConfigError) as exc:
        validate(make(f"data.paths=['{prefix}']", base=[]), 1, CPU, check_files=True)
    assert_config_error(exc, "data.paths[0]", f"{prefix}.idx does not exist")


def test_missing_files_ignored_without_check_files(tmp_path):
    cfg = make(f"data.paths=['{tmp_path / 'absent'}']", f"checkpoint.load={tmp_path / 'nope'}",
               base=[])
    validate(cfg, world_size=1, platform=CPU, check_files=False)


def test_checkpoint_load_missing_directory(tmp_path):
    prefix = touch_dataset(tmp_path / "ds")
    missing = tmp_path / "no_such_run"
    cfg = make(f"data.paths=['{prefix}']", f"checkpoint.load={missing}", base=[])
    with pytest.raises(ConfigError) as exc:
        validate(cfg, world_size=1, platform=CPU, check_files=True)
    assert_config_error(exc, "checkpoint.load", f"{missing} is not a directory")
