"""Every shipped example config loads and validates at its smallest world size (DP=1)."""
from __future__ import annotations

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
