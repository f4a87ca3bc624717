"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


NO_SHARED_DATA = "shared data directory"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real corpora for tests: ``$SRP_SHARED_DATA``, default ``<repo>/../shared/data``.

    Missing, a test that needs them is skipped, and the end of the run says how many were; in
    CI (``CI=true``) the run stops with an error instead, so a green CI run never means that
    most of the suite did not run."""
    path = Path(os.environ.get("SRP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        message = (f"{NO_SHARED_DATA} {path} not found (set SRP_SHARED_DATA to its location)")
        if _in_ci():
            pytest.exit(f"CI=true and {message}: the tests that need it cannot run", returncode=1)
        pytest.skip(message)
    return path


def pytest_terminal_summary(terminalreporter) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if NO_SHARED_DATA in str(getattr(r, "longrepr", ""))]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} test(s) skipped: no shared data (set SRP_SHARED_DATA; with CI=true "
            f"this fails the run)", yellow=True, bold=True)


@pytest.fixture(scope="session")
def shakespeare_dataset(shared_data: Path, tmp_path_factory) -> str:
    """tinyshakespeare as a Megatron indexed dataset (real preprocessing, shipped tokenizer)."""
    from megatron_srp.data.preprocess import preprocess
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

    prefix = tmp_path_factory.mktemp("data") / "shakespeare"
    preprocess([shared_data / "tinyshakespeare" / "input.txt"], prefix,
               SRPTokenizer.from_dir(default_tokenizer_dir()), workers=2, progress=False)
    return str(prefix)


def run_child(script: str, tmp_path_factory) -> dict:
    """The JSON a ``tests/_*_child.py`` script writes, run in a process of its own (Megatron's
    global parallel state makes reusing pytest's fragile)."""
    import json
    import subprocess
    import sys

    out = tmp_path_factory.mktemp(Path(script).stem.strip("_")) / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, script, str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def inference_checks(tmp_path_factory) -> dict:
    """The measurements of tests/_inference_child.py (generation, reflection reading,
    activations) on a real Megatron model, computed once in a process of their own."""
    return run_child("tests/_inference_child.py", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_pretrained(shakespeare_dataset: str, tmp_path_factory) -> Path:
    """A tiny model pretrained for 20 steps on 2 ranks: the starting point of finetuning and
    attack tests (a run directory with its tokenizer and latest checkpoint)."""
    from megatron_srp.training.launch import TINY, run_pretrain

    out = tmp_path_factory.mktemp("tiny_pretrained")
    run_pretrain(2, [*TINY, f"data.paths=[{shakespeare_dataset}]", f"checkpoint.save={out}",
                     "train.train_iters=20"])
    return out


@pytest.fixture(scope="session")
def tiny_long_context(shakespeare_dataset: str, tmp_path_factory) -> Path:
    """A tiny model with a 1024-token context, pretrained for a few steps on one rank: long
    enough for the judges' and writers' prompts when it is served (its answers are noise)."""
    from megatron_srp.training.launch import TINY, run_pretrain

    out = tmp_path_factory.mktemp("tiny_long_context")
    run_pretrain(1, [*TINY, f"data.paths=[{shakespeare_dataset}]", f"checkpoint.save={out}",
                     "train.seq_length=1024", "train.micro_batch_size=1",
                     "train.global_batch_size=2", "train.train_iters=4"])
    return out


@pytest.fixture(scope="session")
def served_tiny(tiny_long_context: Path, tmp_path_factory):
    """tools/serve_srp.py serving ``tiny_long_context`` in a subprocess on a free loopback
    port, for the whole session; ``.name`` is the model name it answers to."""
    from megatron_srp.bench.serve import ServerProcess
    from megatron_srp.serving.server import model_name

    log = tmp_path_factory.mktemp("served_tiny") / "server.log"
    with ServerProcess(tiny_long_context, ["--max-batch", "8"], log_path=log) as srv:
        srv.name = model_name(tiny_long_context)
        srv.checkpoint_dir = tiny_long_context
        yield srv


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A local two-node Slurm cluster (megatron_srp/deploy/local_slurm.py), shared by every
    ``slurm`` test; skips, saying why, where one cannot start."""
    from megatron_srp.deploy.local_slurm import LocalSlurm, Unavailable, ensure_installed

    try:
        if os.environ.get("SRP_INSTALL_SLURM") == "1":
            ensure_installed()
        cluster = LocalSlurm(tmp_path_factory.mktemp("cluster"), nodes=2)
        cluster.start()
    except Unavailable as e:
        pytest.skip(f"no local Slurm cluster here: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def cluster_inputs(tmp_path_factory, shared_data: Path) -> Path:
    """The cluster tests' shared directory: a copy of three inputs under ``in/`` (a copy, so
    a node can be made to miss it)."""
    root = tmp_path_factory.mktemp("shared")
    inputs = root / "in"
    inputs.mkdir()
    for name in ("wikitext2/valid.txt", "wikitext2/test.txt", "toxigen/toxigen_statements.jsonl"):
        shutil.copy(shared_data / name, inputs / Path(name).name)
    return root


@pytest.fixture(scope="session")
def local_preprocess_run(cluster_inputs: Path) -> Path:
    """The cluster tests' inputs preprocessed by the local backend, to compare with."""
    from _cluster_preprocess import RUN_TIMEOUT, args

    out = cluster_inputs / "local"
    done = subprocess.run([*args(cluster_inputs, out), "--workers", "1"], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out
