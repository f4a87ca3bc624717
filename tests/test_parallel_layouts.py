"""Every parallel layout trains the same model: losses match TP=1/PP=1/DP=1 step for step.

Real Megatron-Core, real gloo process groups through torchrun, real data.
"""
from __future__ import annotations

import pytest

from megatron_srp.training.launch import TINY, run_pretrain, train_losses

STEPS = 10
# fp32 on CPU; layouts differ only in reduction order, so differences stay near 1e-6.
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def reference(shakespeare_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_pretrain(1, [*TINY, f"data.paths=[{shakespeare_dataset}]", f"checkpoint.save={out}",
                     f"train.train_iters={STEPS}"])
    return train_losses(out)


LAYOUTS = {
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
    "tp2_sequence_parallel": (2, ["parallel.tensor_model_parallel_size=2",
                                  "parallel.sequence_parallel=true"]),
    "dp2": (2, []),
    "pp2_interleaved": (2, ["parallel.pipeline_model_parallel_size=2",
                            "parallel.virtual_pipeline_model_parallel_size=2"]),
    "tp2_pp2": (4, ["parallel.tensor_model_parallel_size=2",
                    "parallel.pipeline_model_parallel_size=2"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(name, reference, shakespeare_dataset, tmp_path):
    nproc, layout = LAYOUTS[name]
    run_pretrain(nproc, [*TINY, *layout, f"data.paths=[{shakespeare_dataset}]",
                         f"checkpoint.save={tmp_path}", f"train.train_iters={STEPS}"])
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    worst = max(abs(losses[s] - reference[s]) for s in reference)
    assert worst < TOLERANCE, f"{name}: max |loss - reference| = {worst:.2e}\n{losses}\n{reference}"
    # The model must really be learning, not matching because nothing moves.
    assert reference[STEPS] < reference[1] - 0.5
