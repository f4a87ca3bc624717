"""The NeMo-Run launcher: configs are checked before submission, the local executor runs the
same torchrun command a person would type (and trains), and the Slurm executor writes an sbatch
script with the job's nodes, GPUs, container and command. NeMo-Run's own objects throughout."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_srp.config import ConfigError, load_config, to_dict
from megatron_srp.deploy.nemo_run import (
    REPO_ROOT, LocalTarget, SlurmTarget, check_config, launch, require_nemo_run,
)
from megatron_srp.training.launch import TINY

IMAGE = "nvcr.io/nvidia/pytorch:25.10-py3"
CONFIG_70B = "examples/scale/llama_70b_64gpu.yaml"


def _slurm(tmp_path: Path, **kw) -> SlurmTarget:
    return SlurmTarget(**{"account": "acct", "partition": "batch", "nodes": 8,
                          "job_dir": str(tmp_path / "cluster"), "container_image": IMAGE, **kw})


def test_layout_that_does_not_fit_the_allocation_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="world size 24 is not divisible by TP x PP = 32"):
        check_config(CONFIG_70B, ["data.paths=[/lustre/corpus]"], _slurm(tmp_path, nodes=3))


def test_shipped_code_needs_absolute_data_and_checkpoint_paths(tmp_path):
    with pytest.raises(ConfigError, match=r"'data\.paths'.*'data/corpus' is relative"):
        check_config(CONFIG_70B, [], _slurm(tmp_path))
    with pytest.raises(ConfigError, match=r"'checkpoint\.save'.*'runs/llama-70b' is relative"):
        check_config(CONFIG_70B, ["data.paths=[/lustre/corpus]"], _slurm(tmp_path))
    ok = ["data.paths=[/lustre/corpus]", "checkpoint.save=/lustre/runs/70b"]
    assert check_config(CONFIG_70B, ok, _slurm(tmp_path)).parallel.pipeline_model_parallel_size == 4
    # A checkout on the cluster has data/ and runs/ of its own: relative paths are fine there.
    check_config(CONFIG_70B, [], _slurm(tmp_path, code_dir="/lustre/me/megatron-srp"))


def test_cpu_nodes_need_ranks_per_node_and_are_validated_as_cpus(tmp_path):
    with pytest.raises(ValueError, match="gpus_per_node=0 .* needs ranks_per_node"):
        _slurm(tmp_path, gpus_per_node=0, container_image=None)
    cpu = _slurm(tmp_path, nodes=2, gpus_per_node=0, ranks_per_node=1, container_image=None)
    assert cpu.world_size == 2
    tiny = ["data.paths=[/shared/corpus]", "checkpoint.save=/shared/runs/tiny"]
    assert check_config("examples/tiny_cpu.yaml", tiny, cpu).train.train_iters == 300
    with pytest.raises(ConfigError, match="bf16 needs a CUDA GPU"):
        check_config("examples/tiny_cpu.yaml", [*tiny, "train.precision=bf16"], cpu)
    with pytest.raises(ValueError, match="either venv or container_image"):
        _slurm(tmp_path, venv="/shared/venv")
    with pytest.raises(ValueError, match="contains '/nemo_run'"):
        _slurm(tmp_path, container_image=None, job_dir="/shared/nemo_run/jobs")


def test_missing_nemo_run_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "nemo_run", None)  # what an absent package looks like
    with pytest.raises(ImportError, match="pip install nemo_run"):
        require_nemo_run()


def test_local_executor_runs_the_typed_torchrun_command(shakespeare_dataset, tmp_path):
    # The config names a dataset that exists (the local launch checks the files first).
    config = tmp_path / "tiny.yaml"
    config.write_text(f"base: {REPO_ROOT / 'examples' / 'tiny_cpu.yaml'}\n"
                      f"data:\n  paths: [{shakespeare_dataset}]\n")
    plain = ["train.train_iters=3", "train.warmup_iters=1"]
    done = launch(LocalTarget(2), str(config), plain, dryrun=True,
                  base_dir=str(tmp_path), quiet=True)
    argv = shlex.split(done.rendered)
    assert argv[0] == "torchrun" and done.handle is None
    assert argv[argv.index("--nnodes") + 1] == "1"
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    tool = argv.index(str(REPO_ROOT / "tools" / "pretrain_srp.py"))
    assert argv[tool + 1:] == ["--config", str(config), *plain]

    # An override the shell would need quoted goes into a config layer over the same file.
    bracketed = [*plain, f"data.paths=[{shakespeare_dataset}]"]
    done = launch(LocalTarget(2), "examples/tiny_cpu.yaml", bracketed, dryrun=True,
                  base_dir=str(tmp_path), quiet=True)
    argv = shlex.split(done.rendered)
    layer = argv[argv.index("--config") + 1]
    assert argv[-2:] == ["--config", layer] and Path(layer).parent == tmp_path / "srp-config-layers"
    assert to_dict(load_config(layer)) == to_dict(load_config("examples/tiny_cpu.yaml", bracketed))


def test_local_executor_trains_the_tiny_preset(shakespeare_dataset, tmp_path):
    """Through the tool, in a process of its own: NeMo-Run keeps its local job table in
    $NEMORUN_HOME, read once at import. PATH lacks the venv: the launcher supplies torchrun."""
    save = tmp_path / "run"
    cmd = [sys.executable, "tools/launch_nemo_run.py", "local", "--nproc-per-node", "1",
           *TINY, f"data.paths=[{shakespeare_dataset}]", f"checkpoint.save={save}",
           "train.train_iters=2", "train.warmup_iters=1", "logging.log_interval=1"]
    env = {"NEMORUN_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert out.stdout.strip().splitlines()[-1].endswith(": SUCCEEDED")
    steps = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["split"] == "train"] == [1, 2]
    assert (save / "latest").read_text().strip() == "iter_0000002"


def test_slurm_executor_writes_the_sbatch_script(tmp_path, monkeypatch):
    # NeMo-Run packages the code with shell commands that read stdin; pytest forbids that.
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    overrides = ["data.paths=[/lustre/corpus]", "checkpoint.save=/lustre/runs/70b"]
    target = _slurm(tmp_path, container_mounts=("/lustre:/lustre",), time="12:00:00")
    script = launch(target, CONFIG_70B, overrides, dryrun=True, base_dir=str(tmp_path / "home"),
                    quiet=True).rendered
    for line in ("#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --nodes=8",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive",
                 "#SBATCH --time=12:00:00", "export CUDA_DEVICE_MAX_CONNECTIONS=1",
                 "export PYTHONPATH=/nemo_run/code"):
        assert line in script.splitlines(), line
    srun_line = next(line for line in script.splitlines() if line.startswith("srun "))
    srun = shlex.split(srun_line)
    assert srun[srun.index("--container-image") + 1] == IMAGE
    assert srun[srun.index("--container-mounts") + 1].startswith("/lustre:/lustre,")
    assert srun[srun.index("--container-workdir") + 1] == "/nemo_run/code"
    # torchrun runs under a bash that ignores the stop signals, and handles none of them itself
    wrapper = srun[srun.index("torchrun") - 4:srun.index("torchrun")]
    assert wrapper[:2] == ["bash", "-c"] and wrapper[2].startswith('trap "" TERM USR1; exec "$1" '
                                                                   "--signals-to-handle=SIGINT,"
                                                                   "SIGHUP,SIGQUIT ")
    lines = script.splitlines()
    # the graceful stop: the signal before the time limit, the marker the ranks write (the job
    # directory as the container sees it), and the requeue after the srun
    assert "#SBATCH --signal=USR1@120" in lines
    assert "export SRP_STOP_MARKER=/nemo_run/stopped.json" in lines
    marker = next(line for line in lines if line.startswith("srp_stop_marker="))
    assert marker.startswith(f"srp_stop_marker={tmp_path}/cluster/experiments/srp-pretrain/")
    assert marker.endswith("/srp-pretrain/stopped.json")
    assert lines.index("trap srp_after_step EXIT") < lines.index(srun_line)
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "exit 75" in script
    assert not (tmp_path / "cluster").exists()  # a dry run writes nothing into the job dir
    torchrun = srun[srun.index("torchrun"):]
    assert torchrun[torchrun.index("--nnodes") + 1] == "8"
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "8"
    assert torchrun[torchrun.index("--rdzv-backend") + 1] == "c10d"
    assert torchrun[-5:] == ["tools/pretrain_srp.py", "--config", CONFIG_70B, *overrides]


def test_launch_tool_with_a_checkout_on_the_cluster(tmp_path):
    cmd = [sys.executable, "tools/launch_nemo_run.py", "slurm", "--account", "acct",
           "--nodes", "32", "--container-image", IMAGE, "--job-dir", str(tmp_path / "jobs"),
           "--code-dir", "/lustre/me/megatron-srp", "--dryrun",
           "--config", "examples/scale/llama_70b_256gpu.yaml", "train.train_iters=20000"]
    env = {"NEMORUN_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "#SBATCH --nodes=32" in out.stdout
    srun = shlex.split(next(line for line in out.stdout.splitlines() if line.startswith("srun ")))
    assert "/lustre/me/megatron-srp:/lustre/me/megatron-srp" in srun[srun.index(
        "--container-mounts") + 1].split(",")
    assert srun[-3:] == ["--config", cmd[-2], "train.train_iters=20000"]
    bad = subprocess.run(cmd[:6] + ["3"] + cmd[7:], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "world size 24 is not divisible" in bad.stderr
