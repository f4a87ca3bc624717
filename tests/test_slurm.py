"""examples/slurm/pretrain.sbatch on a real Slurm: two slurmd in two network namespaces on this
machine (megatron_srp/deploy/local_slurm.py), a tiny CPU run in venv mode.

One node with 2 ranks, then two nodes with 1 rank each (the c10d rendezvous and gloo cross
the veth pair between the namespaces): the same losses. A graceful preemption
(``scancel --signal=TERM``) saves, requeues and resumes with the uninterrupted losses. A node
whose processes are SIGKILLed fails the job with a message naming it, and a resubmission
resumes from the last complete checkpoint.

Marked ``slurm``: ``make test-slurm`` (run by .ci/run) installs slurm-wlm and munge where they
are missing; without root or namespaces the tests skip and say why.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from _cluster_training import STEPS, assert_same_losses, latest_step, wait_steps
from megatron_srp.deploy.local_slurm import LocalSlurm
from megatron_srp.training.launch import TINY, train_losses

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "examples" / "slurm" / "pretrain.sbatch"


@pytest.fixture(scope="module")
def cluster(slurm_cluster) -> LocalSlurm:
    return slurm_cluster


def _submit(cluster: LocalSlurm, work: Path, dataset: str, nodes: int, run: Path,
            *extra: str) -> int:
    env = {**os.environ, "VENV": sys.prefix, "GPUS_PER_NODE": str(2 // nodes),
           "OMP_NUM_THREADS": "1", "LOG_DIR": str(work / "logs"), "MASTER_PORT": "29533"}
    overrides = [*TINY, f"data.paths=[{dataset}]", f"checkpoint.save={run}",
                 f"train.train_iters={STEPS}", "checkpoint.save_interval=5",
                 "checkpoint.keep_last=10", *extra]
    return cluster.sbatch([f"--nodes={nodes}", "--gpus-per-node=0", f"--chdir={REPO}",
                           f"--output={work}/job-%j.out", str(SBATCH),
                           "examples/tiny_cpu.yaml", *overrides], env=env)


def _output(work: Path, job: int) -> str:
    p = work / f"job-{job}.out"
    return p.read_text(errors="replace") if p.exists() else ""


@pytest.fixture(scope="module")
def single_node(cluster, shakespeare_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("single")
    run = work / "run"
    job = _submit(cluster, work, shakespeare_dataset, 1, run)
    info = cluster.wait(job, timeout=600)
    return job, info, work, run


def test_single_node_sbatch_trains_and_saves(single_node):
    job, info, work, run = single_node
    out = _output(work, job)
    assert info["JobState"] == "COMPLETED", out[-3000:]
    assert info["NodeList"] == "node1" and info["Restarts"] == "0"
    assert sorted(train_losses(run)) == list(range(1, STEPS + 1))
    assert latest_step(run) == STEPS
    assert {p.name for p in run.glob("iter_*")} == {f"iter_{s:07d}" for s in (5, 10, 15, 20)}
    facts = json.loads((run / f"iter_{STEPS:07d}" / "run.json").read_text())
    assert facts["progress"]["iteration"] == STEPS
    launch = (work / "logs" / "launch.txt").read_text()
    assert f"job {job} (restart 0): 1 nodes x 2 ranks, head node1:29533" in launch
    assert f"runtime: venv {sys.prefix}" in launch


def test_two_node_sbatch_matches_single_node(cluster, single_node, shakespeare_dataset,
                                             tmp_path):
    run = tmp_path / "run"
    job = _submit(cluster, tmp_path, shakespeare_dataset, 2, run)
    info = cluster.wait(job, timeout=600)
    out = _output(tmp_path, job)
    assert info["JobState"] == "COMPLETED", out[-3000:]
    assert info["NodeList"] == "node[1-2]"
    # one torchrun per node, each with one rank, meeting at node1's rendezvous
    attempts = sorted((tmp_path / "logs" / "ranks").iterdir())
    assert len(attempts) == 2, attempts
    assert "1 ranks, head node1:29533" in (tmp_path / "logs" / "launch.txt").read_text()
    assert_same_losses(train_losses(run), train_losses(single_node[3]))
    assert latest_step(run) == STEPS


def test_graceful_preemption_saves_requeues_and_resumes_exactly(cluster, single_node,
                                                                shakespeare_dataset, tmp_path):
    run = tmp_path / "run"
    job = _submit(cluster, tmp_path, shakespeare_dataset, 2, run)
    cluster.wait(job, states=("RUNNING",))
    wait_steps(run, 7)
    cluster.run(["scancel", "--signal=TERM", str(job)])
    # Slurm holds a requeued job until its old credential expires (AuthInfo cred_expire, 10 s
    # on this cluster), then starts it by itself.
    cluster.wait(job, states=("PENDING",), condition=lambda j: j["Restarts"] == "1",
                 timeout=300)
    info = cluster.wait(job, condition=lambda j: j["Restarts"] == "1", timeout=600)
    out = _output(tmp_path, job)
    assert info["JobState"] == "COMPLETED", out[-3000:]
    marker = json.loads((tmp_path / "logs" / "stopped.json").read_text()) \
        if (tmp_path / "logs" / "stopped.json").exists() else None
    assert marker is None  # the requeued run finished: its launch cleared the marker
    stopped = [line for line in out.splitlines() if "stopped gracefully" in line]
    assert len(stopped) == 1, out[-3000:]
    record = json.loads(stopped[0].split("gracefully: ", 1)[1])
    step = record["iteration"]
    assert 7 <= step < STEPS and record["reason"] == "SIGTERM"
    assert record["checkpoint"].endswith(f"iter_{step:07d}")
    assert f"requeueing job {job}" in out and f"job {job} (restart 1)" in out
    assert f"starting at step {step}" in out
    assert (run / f"iter_{step:07d}" / "run.json").is_file()  # the stop's own checkpoint
    assert_same_losses(train_losses(run), train_losses(single_node[3]))


def test_a_killed_node_fails_the_job_by_name_and_a_resubmission_resumes(
        cluster, single_node, shakespeare_dataset, tmp_path):
    run = tmp_path / "run"
    job = _submit(cluster, tmp_path, shakespeare_dataset, 2, run)
    cluster.wait(job, states=("RUNNING",))
    wait_steps(run, 12)
    saved = latest_step(run)
    assert saved >= 10
    victims = cluster.node_pids("node2")
    assert victims, "no job process on node2"
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    info = cluster.wait(job, timeout=300)
    out = _output(tmp_path, job)
    assert info["JobState"] == "FAILED", out[-3000:]
    assert "node2" in "\n".join(line for line in out.splitlines() if "error" in line.lower()), \
        out[-3000:]
    assert "stopped gracefully" not in out and info["Restarts"] == "0"
    latest = latest_step(run)
    assert latest >= saved and (run / f"iter_{latest:07d}" / "run.json").is_file()

    again = _submit(cluster, tmp_path, shakespeare_dataset, 2, run)
    info = cluster.wait(again, timeout=600)
    out = _output(tmp_path, again)
    assert info["JobState"] == "COMPLETED", out[-3000:]
    assert f"starting at step {latest}" in out
    assert_same_losses(train_losses(run), train_losses(single_node[3]))
