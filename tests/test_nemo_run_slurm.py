"""NeMo-Run's Slurm executor on a real Slurm: the local two-node cluster of
megatron_srp/deploy/local_slurm.py, CPU nodes, the checkout's virtual environment, no container.

``tools/launch_nemo_run.py slurm`` submits through NeMo-Run's LocalTunnel, which runs
``sbatch`` (and ``squeue``, ``scontrol``, ``sacct``) as a login node would: here they are small
commands on PATH that run the real ones on node1 with the cluster's configuration. A tiny run
across both nodes trains to the losses of the same run under a plain local torchrun; a graceful
stop (``scancel --signal=TERM``, or the USR1 of the time limit) saves, the job requeues itself
and resumes to those losses.

Marked ``slurm`` (``make test-slurm``); without root or namespaces the tests skip and say why.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from _cluster_training import STEPS, assert_same_losses, latest_step, wait_steps
from megatron_srp.deploy.local_slurm import LocalSlurm
from megatron_srp.training.launch import (
    JOB_TAG_ENV, TINY, run_pretrain, train_losses, wait_for_no_processes,
)

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
CONFIG = "examples/tiny_cpu.yaml"
CLIENT_COMMANDS = ("sbatch", "squeue", "scontrol", "scancel", "sacct", "sinfo")


def _overrides(dataset: str, run: Path) -> list[str]:
    return [*TINY, f"data.paths=[{dataset}]", f"checkpoint.save={run}",
            f"train.train_iters={STEPS}", "checkpoint.save_interval=5",
            "checkpoint.keep_last=10"]


@pytest.fixture(scope="module")
def login_node(slurm_cluster: LocalSlurm, tmp_path_factory) -> Path:
    """A directory for PATH whose Slurm commands act as on a login node of the cluster. Inside
    a job (SLURM_CONF set, PATH inherited from the submission) they are the real ones."""
    bin_dir = tmp_path_factory.mktemp("login-node-bin")
    for name in CLIENT_COMMANDS:
        real = shutil.which(name)
        assert real, f"{name} is not installed"
        wrapper = bin_dir / name
        wrapper.write_text("#!/bin/sh\n"
                           f'[ -n "$SLURM_CONF" ] && exec {shlex.quote(real)} "$@"\n'
                           f'exec {shlex.join(slurm_cluster.command([real]))} "$@"\n')
        wrapper.chmod(0o755)
    return bin_dir


@pytest.fixture(scope="module")
def reference(shakespeare_dataset, tmp_path_factory) -> dict[int, float]:
    """The same run under a plain torchrun on this machine: one node, two ranks."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = run_pretrain(2, ["--config", CONFIG, *_overrides(shakespeare_dataset, run)],
                        env={"OMP_NUM_THREADS": "1"})
    assert wait_for_no_processes(done.job_tag) == []
    return train_losses(run)


class Submitted:
    def __init__(self, job: int, work: Path, run: Path, tag: str) -> None:
        self.job, self.work, self.run, self.tag = job, work, run, tag

    def folder(self) -> Path:
        """The job's directory that NeMo-Run made under --job-dir."""
        found = list((self.work / "jobs").rglob(f"sbatch_*_{self.job}.out"))
        assert len(found) == 1, found
        return found[0].parent

    def batch_output(self) -> str:
        return next(self.folder().glob(f"sbatch_*_{self.job}.out")).read_text(errors="replace")

    def step_output(self, restart: int) -> str:
        """What torchrun and its ranks printed in the job's run number ``restart``."""
        return "".join(p.read_text(errors="replace")
                       for p in self.folder().glob(f"log-*_{self.job}_{restart}.out"))


def _submit(login_node: Path, work: Path, dataset: str) -> Submitted:
    run, tag = work / "run", uuid.uuid4().hex
    cmd = [sys.executable, "tools/launch_nemo_run.py", "slurm", "--account", "srp",
           "--nodes", "2", "--gpus-per-node", "0", "--ranks-per-node", "1",
           "--time", "00:30:00", "--no-container", "--venv", sys.prefix, "--code-dir", str(REPO),
           "--job-dir", str(work / "jobs"), "--detach",
           "--config", CONFIG, *_overrides(dataset, run)]
    # The job inherits this environment (sbatch --export=ALL): one thread per rank, and a tag
    # that every process of the job carries.
    env = {**os.environ, "PATH": f"{login_node}:{os.environ['PATH']}",
           "NEMORUN_HOME": str(work / "home"), "OMP_NUM_THREADS": "1", JOB_TAG_ENV: tag}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    handle, state = out.stdout.strip().splitlines()[-1].rsplit(": ", 1)
    assert state == "SUBMITTED", out.stdout[-2000:]
    return Submitted(int(handle.rsplit("/", 1)[-1]), work, run, tag)


def test_slurm_executor_trains_across_two_nodes(slurm_cluster, login_node, reference,
                                                shakespeare_dataset, tmp_path):
    job = _submit(login_node, tmp_path, shakespeare_dataset)
    info = slurm_cluster.wait(job.job, timeout=600)
    assert info["JobState"] == "COMPLETED", job.batch_output()[-3000:]
    assert info["NodeList"] == "node[1-2]" and info["Restarts"] == "0"
    script = next(job.folder().parent.glob("*_sbatch.sh")).read_text()
    assert "#SBATCH --signal=USR1@120" in script.splitlines()
    assert f"export PATH={sys.prefix}/bin:$PATH" in script.splitlines()
    # one torchrun per node, meeting at node1's rendezvous across the two namespaces
    assert "--nnodes 2 --nproc-per-node 1" in script
    step_log = job.step_output(0)
    assert "starting at step 0" in step_log, step_log[-3000:]
    assert_same_losses(train_losses(job.run), reference)
    assert latest_step(job.run) == STEPS
    assert {p.name for p in job.run.glob("iter_*")} == {f"iter_{s:07d}" for s in (5, 10, 15, 20)}
    facts = json.loads((job.run / f"iter_{STEPS:07d}" / "run.json").read_text())
    assert facts["progress"]["iteration"] == STEPS
    assert "stopped gracefully" not in "\n".join(
        line for line in job.batch_output().splitlines() if line.startswith("job "))
    assert wait_for_no_processes(job.tag) == []


# SIGTERM: preemption or `scancel --signal=TERM`; SIGUSR1: what the job's `--signal=USR1@120`
# sends before the time limit (a torchrun that did not ignore it would die of it).
@pytest.mark.parametrize("signal_name", ["TERM", "USR1"])
def test_graceful_stop_saves_requeues_and_resumes_exactly(slurm_cluster, login_node, reference,
                                                          shakespeare_dataset, tmp_path,
                                                          signal_name):
    job = _submit(login_node, tmp_path, shakespeare_dataset)
    slurm_cluster.wait(job.job, states=("RUNNING",))
    wait_steps(job.run, 7)
    slurm_cluster.run(["scancel", f"--signal={signal_name}", str(job.job)])
    # Slurm holds a requeued job until its old credential expires, then starts it by itself.
    slurm_cluster.wait(job.job, states=("PENDING",), condition=lambda j: j["Restarts"] == "1",
                       timeout=300)
    info = slurm_cluster.wait(job.job, condition=lambda j: j["Restarts"] == "1", timeout=600)
    out = job.batch_output()
    assert info["JobState"] == "COMPLETED", out[-3000:]
    stopped = [line for line in out.splitlines()
               if line.startswith(f"job {job.job} stopped gracefully: ")]
    assert len(stopped) == 1, out[-3000:]
    record = json.loads(stopped[0].split("gracefully: ", 1)[1])
    step = record["iteration"]
    assert 7 <= step < STEPS and record["reason"] == f"SIG{signal_name}"
    assert record["checkpoint"].endswith(f"iter_{step:07d}")
    assert f"requeueing job {job.job}; it resumes" in out
    # Both torchruns (one per node) ignored the signal; the ranks caught it, saved and ended.
    stopped_run = job.step_output(0)
    assert stopped_run.count("signals_to_handle        : SIGINT,SIGHUP,SIGQUIT") == 2, \
        stopped_run[-3000:]
    assert "death signal" not in stopped_run, stopped_run[-3000:]
    assert f"(SIG{signal_name}); rerun the same command to resume" in stopped_run
    assert (job.run / f"iter_{step:07d}" / "run.json").is_file()
    resumed = job.step_output(1)
    assert f"starting at step {step}" in resumed, resumed[-3000:]
    assert not (job.folder() / "stopped.json").exists()  # the requeued run cleared it
    assert_same_losses(train_losses(job.run), reference)
    assert latest_step(job.run) == STEPS
    assert wait_for_no_processes(job.tag) == []
