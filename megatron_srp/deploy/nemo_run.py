"""Submit pretraining through NeMo-Run: torchrun on this machine, or a Slurm job.

Teams that schedule with NeMo-Run (executors, SSH tunnels, experiment records) get the same job
as ``examples/slurm/pretrain.sbatch``: one torchrun per node running ``tools/pretrain_srp.py
--config FILE key=value ...``. The config is loaded and validated for the target's world size
before anything is submitted, so a layout that cannot run never waits in a queue.

A Slurm job stops gracefully and requeues itself as ``examples/slurm/pretrain.sbatch`` does (see
:func:`graceful_requeue`). On CPU nodes (``gpus_per_node=0``, ``ranks_per_node`` ranks each) and
without a container (``venv``), the same job runs on any Slurm, such as the local test cluster of
``megatron_srp/deploy/local_slurm.py``.

NeMo-Run is imported only when used (the ``nemo-run`` extra, also in ``dev``; docs/deployment.md).
"""
from __future__ import annotations

import getpass
import importlib
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence, Union

from megatron_srp.config import ConfigError, ExperimentConfig, load_config
from megatron_srp.validation import HOPPER_WITH_TE, Platform, validate

REPO_ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = "tools/pretrain_srp.py"
# The job environment on GPU nodes; the same as examples/slurm/pretrain.sbatch sets.
CLUSTER_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # TP / SP collectives are queued ahead of compute
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",  # frees communication buffers earlier
    "NCCL_DEBUG": "WARN",
    "OMP_NUM_THREADS": "8",
    "PYTHONUNBUFFERED": "1",
}
# What a CPU job (gpus_per_node=0) is validated for: fp32, local layer specs.
CPU_NODE = Platform(has_cuda=False, capability=None, has_transformer_engine=False)
# Slurm sends this to every process of the job 120 s before its time limit (sbatch --signal);
# the ranks catch it (train.exit_signals) and stop with a checkpoint.
TIME_LIMIT_SIGNAL = "USR1@120"
# Where the job's files live in its container (NeMo-Run mounts the job directory there; without
# a container NeMo-Run writes the job directory's own path in its place).
RUNDIR = "/nemo_run"


def require_nemo_run() -> ModuleType:
    """The ``nemo_run`` module, or an ImportError that says what to install."""
    try:
        return importlib.import_module("nemo_run")
    except ImportError as exc:
        if exc.name == "nemo_run":
            raise ImportError("NeMo-Run is not installed: pip install nemo_run "
                              "(see docs/deployment.md, 'NeMo-Run')") from exc
        # nemo_run 0.11.1 imports leptonai.api.v1, which leptonai 0.47 removed.
        raise ImportError(f"NeMo-Run is installed but does not import ({exc}); "
                          "pip install 'leptonai<0.47' fixes the known case") from exc


@dataclass(frozen=True)
class LocalTarget:
    """torchrun on this machine: a workstation or one node."""

    nproc_per_node: int = 1

    @property
    def world_size(self) -> int:
        return self.nproc_per_node


@dataclass(frozen=True)
class SlurmTarget:
    """An sbatch job of ``nodes`` nodes, one torchrun per node over ``ranks_per_node`` ranks
    (default: ``gpus_per_node``, one rank per GPU).

    ``job_dir`` is where NeMo-Run keeps the job's files on the cluster. Without ``code_dir`` the
    committed HEAD of this checkout is shipped with the job (NeMo-Run's GitArchivePackager);
    with it, the job runs the checkout at that path on the cluster's shared filesystem.
    ``container_image`` None runs in the nodes' own environment: ``torchrun`` from ``venv``
    (a virtual environment every node sees at that path), else from the nodes' PATH.
    ``gpus_per_node=0`` asks for CPU nodes; ``ranks_per_node`` then says how many ranks.
    A graceful stop (preemption, the time limit, ``scancel --signal=TERM``) saves and, with
    ``requeue``, requeues the job (at most ``max_requeues`` times), which resumes.
    """

    account: str
    nodes: int
    job_dir: str
    container_image: Optional[str]
    partition: Optional[str] = None
    gpus_per_node: int = 8
    ranks_per_node: Optional[int] = None
    time: str = "04:00:00"
    container_mounts: tuple[str, ...] = ()
    venv: Optional[str] = None
    ssh_host: Optional[str] = None  # submit over SSH; None: sbatch here (a login node)
    ssh_user: Optional[str] = None
    code_dir: Optional[str] = None
    requeue: bool = True
    max_requeues: int = 20
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be at least 1, not {self.nodes}")
        if self.gpus_per_node < 0 or (self.ranks_per_node is not None
                                      and self.ranks_per_node < 1):
            raise ValueError(f"gpus_per_node must be >= 0 and ranks_per_node >= 1, not "
                             f"{self.gpus_per_node} and {self.ranks_per_node}")
        if self.gpus_per_node == 0 and self.ranks_per_node is None:
            raise ValueError("gpus_per_node=0 (CPU nodes) needs ranks_per_node, the number of "
                             "ranks torchrun starts on each node")
        if self.venv and self.container_image:
            raise ValueError("venv runs without a container; give either venv or "
                             "container_image, not both")
        if self.container_image is None and RUNDIR in self.job_dir:
            # Without a container NeMo-Run replaces every "/nemo_run" in the sbatch script
            # with the job directory's path, this one's included.
            raise ValueError(f"job_dir {self.job_dir!r} contains {RUNDIR!r}, which NeMo-Run "
                             "rewrites in a job without a container; choose another directory")

    @property
    def ranks(self) -> int:
        """torchrun's processes per node."""
        return self.gpus_per_node if self.ranks_per_node is None else self.ranks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks


Target = Union[LocalTarget, SlurmTarget]


@dataclass(frozen=True)
class Submission:
    """What was (or, for a dry run, would be) run: the torchrun command line on this machine,
    or the sbatch script; the NeMo-Run handle and final state when it was launched."""

    rendered: str
    handle: Optional[str] = None
    state: Optional[str] = None


def check_config(config: Optional[str], overrides: Sequence[str],
                 target: Target) -> ExperimentConfig:
    """The run's config, validated for the target's world size (ConfigError otherwise).

    A shipped code copy has no ``data/`` or ``runs/``, so a Slurm job without ``code_dir`` must
    name its datasets, tokenizer and checkpoints by absolute paths on the shared filesystem.
    """
    cfg = load_config(config, list(overrides))
    local = isinstance(target, LocalTarget)
    if local:
        platform = Platform.detect()
    else:
        platform = CPU_NODE if target.gpus_per_node == 0 else HOPPER_WITH_TE
    validate(cfg, target.world_size, platform, check_files=local)
    if isinstance(target, SlurmTarget) and target.code_dir is None:
        paths = [("data.paths" if not cfg.data.curriculum else "data.curriculum", p)
                 for p in cfg.data.prefixes()]
        paths += [("data.tokenizer", cfg.data.tokenizer), ("checkpoint.save", cfg.checkpoint.save),
                  ("checkpoint.load", cfg.checkpoint.load)]
        for key, path in paths:
            if path and not os.path.isabs(path):
                raise ConfigError(key, f"{path!r} is relative, but the job runs in a shipped copy "
                                  "of the code; give an absolute path on the cluster's shared "
                                  "filesystem, or run a checkout there (code_dir / --code-dir)")
    return cfg


def pretrain_script(config: Optional[str], overrides: Sequence[str], target: Target,
                    layer_dir: Optional[str] = None) -> Any:
    """The NeMo-Run Script: ``python tools/pretrain_srp.py --config FILE key=value ...``, which the
    executor's torchrun launcher wraps. Locally the tool is named by its absolute path, on Slurm
    relative to the job's code directory (its working directory).

    NeMo-Run quotes the launcher's arguments for a shell, but its local scheduler starts them
    without one, so an override such as ``data.paths=[a]`` would arrive with its quotes. Locally,
    such overrides are written to a config layer in ``layer_dir`` whose ``base`` is ``config``.
    """
    run = require_nemo_run()
    args = [*(["--config", str(config)] if config else []), *overrides]
    path = PRETRAIN
    if isinstance(target, LocalTarget):
        path = str(REPO_ROOT / PRETRAIN)
        if any(shlex.quote(a) != a for a in args):
            args = ["--config", _config_layer(config, overrides, Path(layer_dir or "."))]
    return run.Script(path=path, args=args, entrypoint="python")


def _config_layer(config: Optional[str], overrides: Sequence[str], layer_dir: Path) -> str:
    from omegaconf import OmegaConf

    layer = OmegaConf.from_dotlist(list(overrides))
    if config:
        layer.base = os.path.abspath(config)
    layer_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="overrides-", suffix=".yaml", dir=layer_dir)
    with os.fdopen(fd, "w") as f:
        f.write(OmegaConf.to_yaml(layer))
    return path


def local_executor(target: LocalTarget) -> Any:
    """NeMo-Run's LocalExecutor with its torchrun launcher."""
    run = require_nemo_run()
    # NeMo-Run starts `torchrun` from PATH: this interpreter's environment comes first.
    return run.LocalExecutor(ntasks_per_node=target.nproc_per_node, launcher="torchrun",
                             env_vars={"PATH": str(Path(sys.executable).parent)})


def slurm_executor(target: SlurmTarget) -> Any:
    """NeMo-Run's SlurmExecutor: exclusive nodes, torchrun launcher, a pyxis container or the
    nodes' own environment. The graceful stop's parts that need the job's directory are added
    by :func:`graceful_requeue` once NeMo-Run has assigned it."""
    run = require_nemo_run()
    from nemo_run.config import RUNDIR_NAME

    if target.ssh_host:
        tunnel = run.SSHTunnel(host=target.ssh_host, user=target.ssh_user or getpass.getuser(),
                               job_dir=target.job_dir)
    else:
        # Through a LocalTunnel NeMo-Run submits the sbatch script from where it wrote it, the
        # experiment's directory: launch() keeps the experiment in job_dir, which is this.
        tunnel = run.LocalTunnel(job_dir=os.path.join(target.job_dir, "experiments"))
    mounts = list(target.container_mounts)
    if target.code_dir:
        # The job's code directory becomes a link to the checkout. (NeMo-Run links it only for
        # a packager subclass; the base Packager would leave the job without code.)
        packager = run.GitArchivePackager(symlink_from_remote_dir=target.code_dir)
        mounts.append(f"{target.code_dir}:{target.code_dir}")
    else:
        # Committed code only (git archive of HEAD); NeMo-Run needs the launch to be started
        # from inside a git checkout.
        packager = run.GitArchivePackager(basepath=str(REPO_ROOT))
    # The job's code directory (its working directory) comes first on the import path, ahead
    # of any copy of the project installed in the image.
    env = {**CLUSTER_ENV, "PYTHONPATH": f"/{RUNDIR_NAME}/code", **target.env}
    if target.venv:
        env["PATH"] = f"{os.path.abspath(target.venv)}/bin:$PATH"
    return run.SlurmExecutor(
        account=target.account, partition=target.partition, nodes=target.nodes,
        ntasks_per_node=target.ranks, torchrun_nproc_per_node=target.ranks,
        gpus_per_node=target.gpus_per_node or None, time=target.time, exclusive=True,
        signal=TIME_LIMIT_SIGNAL, container_image=target.container_image,
        container_mounts=mounts, tunnel=tunnel, packager=packager, env_vars=env,
        launcher="torchrun", srun_args=list(TORCHRUN_IGNORING_STOP_SIGNALS))


# The graceful stop of examples/slurm/pretrain.sbatch, in NeMo-Run's sbatch script. NeMo-Run's
# torchrun launcher has no hook around the torchrun command and its script template none after
# the srun, so:
# - torchrun ignores SIGTERM and SIGUSR1 (Slurm sends them to every process of the step; a
#   torchrun that handled SIGTERM would cut the ranks' save short, and SIGUSR1 would kill it).
#   NeMo-Run puts the executor's srun_args last before the command, so these words make srun run
#   `bash -c '...' srp-torchrun torchrun ARGS`: bash ignores both signals (an ignored signal
#   stays ignored across exec, in torchrun and its ranks, which install their own handlers) and
#   execs torchrun, told to handle only INT, HUP and QUIT. NeMo-Run 0.11 writes srun_args into
#   the script as they are, so the bash program is quoted here.
# - the script's setup lines (run before the srun) point the ranks at the stop marker, remove
#   a stale one, and set an EXIT trap: after the srun, whatever its status, a marker means a
#   graceful stop, and the job requeues itself (same job id) and resumes from the checkpoint.
TORCHRUN_IGNORING_STOP_SIGNALS = (
    "bash", "-c",
    shlex.quote('trap "" TERM USR1; exec "$1" --signals-to-handle=SIGINT,SIGHUP,SIGQUIT "${@:2}"'),
    "srp-torchrun")


def graceful_requeue(executor: Any, target: SlurmTarget) -> None:
    """Add the stop marker and the requeue to a SlurmExecutor NeMo-Run has assigned to a job
    (its job directory is known then). The ranks write the marker at ``/nemo_run/stopped.json``
    (the job directory as the container sees it); the sbatch script reads it at the job
    directory's own path."""
    from megatron_srp.training.stopping import EXIT_STOPPED, STOP_MARKER_ENV  # imports torch

    job_folder = os.path.join(executor.tunnel.job_dir, Path(executor.job_dir).name)
    marker = shlex.quote(os.path.join(job_folder, "stopped.json"))
    executor.env_vars[STOP_MARKER_ENV] = f"{RUNDIR}/stopped.json"
    if target.requeue:
        limit = int(target.max_requeues)
        then = (f'        if [[ ${{SLURM_RESTART_COUNT:-0}} -lt {limit} ]]; then\n'
                '            echo "requeueing job $SLURM_JOB_ID; it resumes from the checkpoint '
                'above"\n'
                '            scontrol requeue "$SLURM_JOB_ID"\n'
                '            exit 0\n'
                '        fi\n')
    else:
        then = ""
    executor.setup_lines = (
        f"# A graceful stop: the ranks saved, then wrote {STOP_MARKER_ENV}.\n"
        f"srp_stop_marker={marker}\n"
        'rm -f "$srp_stop_marker"\n'
        "srp_after_step() {\n"
        '    if [[ -f $srp_stop_marker ]]; then\n'
        '        echo "job $SLURM_JOB_ID stopped gracefully: $(cat "$srp_stop_marker")"\n'
        f"{then}"
        f"        exit {EXIT_STOPPED}\n"
        "    fi\n"
        "}\n"
        "trap srp_after_step EXIT")


def _render(dryrun_info: Any) -> str:
    request = dryrun_info.request
    if hasattr(request, "materialize"):  # Slurm: the sbatch script
        return request.materialize()
    return "\n".join(shlex.join(replica.args)  # local: each process NeMo-Run starts
                     for replicas in request.role_params.values() for replica in replicas)


def launch(target: Target, config: Optional[str], overrides: Sequence[str] = (), *,
           name: str = "srp-pretrain", dryrun: bool = False, detach: bool = False,
           base_dir: Optional[str] = None, quiet: bool = False) -> Submission:
    """Validate, then run (or dry-run) the pretraining job as a NeMo-Run experiment.

    A local job is waited for; a Slurm job too unless ``detach``. ``base_dir`` holds NeMo-Run's
    experiment records (default ``$NEMORUN_HOME``, ``~/.nemo_run``), except for a Slurm job
    submitted from this machine (not a dry run), whose records are its files in the target's
    ``job_dir``.
    """
    check_config(config, overrides, target)
    run = require_nemo_run()
    if isinstance(target, SlurmTarget) and not target.ssh_host and not dryrun:
        base_dir = target.job_dir  # a dry run renders the same paths and writes nothing there
    layer_dir = os.path.join(base_dir or run.config.get_nemorun_home(), "srp-config-layers")
    script = pretrain_script(config, overrides, target, layer_dir)
    executor = (local_executor(target) if isinstance(target, LocalTarget)
                else slurm_executor(target))
    with run.Experiment(name, executor=executor, base_dir=base_dir, clean_mode=quiet,
                        log_level="WARN" if quiet else "INFO") as exp:
        exp.add(script, name=name, tail_logs=not (quiet or detach))
        if isinstance(target, SlurmTarget):
            graceful_requeue(exp.jobs[0].executor, target)
        if dryrun:
            exp.dryrun(log=False)
        else:
            exp.run(detach=detach)
        job = exp.jobs[0]
    # Leaving the experiment waited for the job. NeMo-Run keeps the request it rendered (the
    # one it submits) on the job.
    state = getattr(job.state, "name", None) if job.launched else None
    return Submission(_render(job._dryrun_info), job.handle or None, state)
