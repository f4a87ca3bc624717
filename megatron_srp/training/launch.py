"""Launch the training tool as a torchrun job from Python, and read what it wrote.

Used by the tests and by experiment recipes that chain several runs (it runs ``tools/`` of a
source checkout). Each job gets its own session and is reaped as a whole when it ends (a rank
that dies hard can otherwise leave Megatron's checkpoint-writer process behind); ``kill_when``
simulates preemption.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_srp.units import prepare_run_dir, write_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = str(REPO_ROOT / "tools" / "pretrain_srp.py")
FINETUNE = str(REPO_ROOT / "tools" / "finetune_srp.py")

# Small enough for a 2-core CPU machine, big enough to exercise TP, PP and virtual stages.
TINY = [
    "model.preset=tiny",
    "train.seq_length=128",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.warmup_iters=2",
    "train.lr=3e-3",
    "train.eval_interval=0",
    "logging.log_interval=5",
    "logging.progress_bar=false",
]


def torchrun_cmd(nproc: int, overrides: list[str], script: str = PRETRAIN) -> list[str]:
    """``script``: PRETRAIN or FINETUNE (both take ``[--config FILE] key=value ...``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", script, *overrides]


#: Every job gets a tag of its own in this variable, which each process it starts inherits
#: (ranks, Megatron's checkpoint-writer manager, multiprocessing's resource trackers), so that
#: :func:`job_processes` can find whatever a job left behind.
JOB_TAG_ENV = "SRP_JOB_TAG"


def _env(extra: dict | None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    env[JOB_TAG_ENV] = uuid.uuid4().hex
    return env


def job_processes(tag: str) -> list[int]:
    """The live processes (Linux: read from /proc) whose environment carries job tag ``tag``."""
    needle = f"{JOB_TAG_ENV}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie has exited; its parent has yet to reap it
                    found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def wait_for_no_processes(tag: str, timeout: float = 30.0) -> list[int]:
    """Wait until no process of job ``tag`` is left; returns those still alive at ``timeout``."""
    deadline = time.time() + timeout
    while True:
        alive = job_processes(tag)
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def run_pretrain(nproc: int, overrides: list[str], env: dict | None = None,
                 timeout: int = 600, check: bool = True, script: str = PRETRAIN
                 ) -> subprocess.CompletedProcess:
    """Run a training job to completion and clean up every process it left behind.

    The job gets its own session and writes to a file, not a pipe: a rank that dies hard
    leaves Megatron's checkpoint-writer Manager process orphaned, and that process would
    otherwise hold the pipe open (and live on) after the job ended.
    """
    with tempfile.TemporaryFile(mode="w+") as log:
        job_env = _env(env)
        proc = subprocess.Popen(torchrun_cmd(nproc, overrides, script), cwd=REPO_ROOT,
                                env=job_env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            _kill_group(proc.pid)
            proc.wait()
        log.seek(0)
        output = log.read()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, output, "")
    done.job_tag = job_env[JOB_TAG_ENV]  # type: ignore[attr-defined]
    if check and done.returncode != 0:
        raise RuntimeError(f"training failed ({done.returncode}):\n{output[-12000:]}")
    return done


def run_job(nproc: int, overrides: list[str], save_dir: Path, log_file: Path,
            script: str = PRETRAIN, what: str = "training", stamp: Optional[str] = None,
            settings: Any = None, log: Optional[Callable[[str], None]] = None) -> bool:
    """Run a training or finetuning job for a pipeline step unless ``save_dir`` already holds
    its finished run; its output goes to ``log_file``. A failure raises with the log's tail.
    Returns whether a job ran (a killed job, rerun, resumes from its own checkpoints).

    ``stamp``: the hash of what the run depends on (megatron_srp/units.py), recorded in
    ``<save_dir>/unit_stamp.json`` before the job starts. A finished or partial run there with
    another stamp (or none) is moved aside to ``<save_dir>.stale-<old stamp>`` and the job runs
    afresh, so a changed setting never reuses or resumes the old model. ``settings``: what the
    stamp was made from, kept beside it for readers."""
    from megatron_srp.training.checkpoint import run_finished

    if stamp is not None:
        state = prepare_run_dir(save_dir, stamp, settings, finished=run_finished)
        if state.moved_to is not None and log is not None:
            log(f"{what}: {save_dir} was trained under other settings; kept at "
                f"{state.moved_to}, training again")
        if state.state == "finished":
            return False
    elif run_finished(save_dir):
        return False
    done = run_pretrain(nproc, overrides, timeout=24 * 3600, check=False, script=script)
    write_atomic(log_file, done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}); log: {log_file}\n"
                           f"{done.stdout[-3000:]}")
    return True


def _kill_group(pgid: int) -> None:
    """SIGKILL the job's process group twice: a process forked while the first signal was being
    delivered (Megatron starts a Manager process at its first save) would escape one."""
    for _ in range(2):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def start_pretrain(nproc: int, overrides: list[str], env: dict | None = None,
                   script: str = PRETRAIN) -> subprocess.Popen:
    """Start training in its own process group, so the whole job can be SIGKILLed; the
    returned process carries the job's tag as ``job_tag`` (see :func:`job_processes`)."""
    job_env = _env(env)
    proc = subprocess.Popen(torchrun_cmd(nproc, overrides, script), cwd=REPO_ROOT, env=job_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.job_tag = job_env[JOB_TAG_ENV]  # type: ignore[attr-defined]
    return proc


def kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            _kill_group(proc.pid)
            proc.wait()
            return
        if proc.poll() is not None:
            raise RuntimeError(f"training ended before the kill point:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    _kill_group(proc.pid)
    raise RuntimeError("kill point never reached")


def train_losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl; the last record of a step wins (resumes)."""
    losses = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "train":
            losses[rec["step"]] = rec["loss"]
    return losses


def records(run_dir: Path, split: str) -> list[dict]:
    """The run's metrics.jsonl lines of one split, parsed strictly (NaN is refused)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line, parse_constant=_reject_constant)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not strict JSON: {exc}") from exc
        if record["split"] == split:
            out.append(record)
    return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")
