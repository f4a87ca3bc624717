"""examples/slurm/preprocess.sbatch on a real Slurm: the local two-node cluster
(megatron_srp/deploy/local_slurm.py), the script making a Ray cluster inside its allocation
(head on the first node, a worker on the second), preprocessing against it from the head, and
stopping it. The datasets are byte-identical to the local backend's, both nodes ran shards, and
no process of the job is left on either node.

Marked ``slurm``: ``make test-slurm`` (run by .ci/run).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from _cluster_preprocess import VARIANTS, assert_identical, summary
from megatron_srp.deploy.local_slurm import LocalSlurm

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "examples" / "slurm" / "preprocess.sbatch"


def test_preprocess_sbatch_runs_ray_on_two_nodes(slurm_cluster: LocalSlurm, cluster_inputs,
                                                  local_preprocess_run, tmp_path):
    pytest.importorskip("ray.data")
    out = tmp_path / "out"
    inputs = cluster_inputs / "in"
    env = {**os.environ, "VENV": sys.prefix, "LOG_DIR": str(tmp_path / "logs"),
           "RAY_TEMP_ROOT": "/tmp", "RAY_PORT": "6380"}
    job = slurm_cluster.sbatch(
        ["--nodes=2", f"--chdir={REPO}", f"--output={tmp_path}/job-%j.out", str(SBATCH),
         "--input", str(inputs / "valid.txt"), "--input", str(inputs / "test.txt"),
         "--input", str(inputs / "toxigen_statements.jsonl"),
         "--text-split", "wikitext-articles", "--variants", ",".join(VARIANTS),
         "--shard-mb", "0.05", "--output-dir", str(out)], env=env)
    try:
        info = slurm_cluster.wait(job, timeout=300)
    finally:
        slurm_cluster.run(["scancel", str(job)], check=False)  # a hung job ends here
        log = (tmp_path / f"job-{job}.out").read_text(errors="replace")
        print(log[-4000:])
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["NodeList"] == "node[1-2]"
    assert "ray cluster ready: 2 nodes at 10.213.77.1:6380" in log, log[-4000:]
    launch = (tmp_path / "logs" / "launch.txt").read_text()
    assert f"job {job}: 2 nodes x 2 CPUs" in launch and "Ray head node1 (10.213.77.1:6380)" in launch
    assert f"runtime: venv {sys.prefix}" in launch
    facts = summary(out)
    assert facts["backend"] == "ray" and facts["workers"] == 4
    assert set(facts["shard_nodes"]) == {"node1", "node2"}, facts["shard_nodes"]
    assert_identical(local_preprocess_run, out)
    # The script stopped its Ray cluster: nothing of the job is left on either node.
    deadline = time.monotonic() + 30
    while any(slurm_cluster.node_pids(n) for n in slurm_cluster.nodes):
        assert time.monotonic() < deadline, {
            n: [Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:200]
                for p in slurm_cluster.node_pids(n)] for n in slurm_cluster.nodes}
        time.sleep(0.5)
