"""Preprocessing on a real two-node Ray cluster: a head and a worker node in two network
namespaces on this machine (megatron_srp/deploy/local_ray.py), the driver on the head, the
inputs and the output on a directory both nodes see (as a shared file system).

- Both nodes run shards, and the datasets are byte-identical to the local backend's.
- The worker node SIGKILLed whole while shards are in flight: Ray retries the lost tasks on
  the head (Ray Data's actor pool restarts actors and retries their tasks without limit) and
  the run completes, byte-identical.
- A worker node that does not mount the input, or cannot write the output, is an error on the
  driver naming the shard, the node and the path, not a hang; nothing is published, and a
  rerun on a healthy cluster resumes from the finished shards to the same bytes.
- The whole cluster lost: the driver fails, nothing is published, a rerun resumes.
- The ``hf`` classifier runs as one actor per GPU (each node declares one GPU to Ray): with
  ``--workers 4`` on two GPUs the pool is two actors, one per node, and the bytes are the
  local backend's.

Marked ``slurm`` (the cluster tests, ``make test-slurm``); without root or namespaces they skip
and say why.
"""
from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from _cluster_preprocess import REPO, RUN_TIMEOUT, args, assert_identical, summary
from megatron_srp.deploy.local_ray import LocalRay
from megatron_srp.deploy.netns import Unavailable

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    pytest.importorskip("ray.data")
    try:
        # One GPU per node, declared to Ray (none is needed to place actors by it).
        cluster = LocalRay(tmp_path_factory.mktemp("raycluster"), nodes=2, cpus_per_node=1,
                           gpus_per_node=1)
        cluster.start()
    except Unavailable as e:
        pytest.skip(f"no local Ray cluster here: {e}")
    yield cluster
    cluster.stop()


def _on_ray(cluster: LocalRay, inputs: Path, out: Path) -> list[str]:
    return cluster.command([*args(inputs, out), "--backend", "ray", "--workers", "2",
                            "--ray-address", cluster.address])


def _nothing_published(out: Path) -> None:
    published = [p.name for p in out.glob("*") if p.suffix in (".bin", ".idx", ".json")
                 or p.name.endswith(".meta.json")]
    assert published == [], published


def _shards(work: Path) -> tuple[dict[int, str], set[int]]:
    """(finished shard -> node that ran it, shards started but not finished)."""
    done = {}
    for f in (work / "done").glob("shard-*.json"):
        try:
            done[int(f.stem.split("-")[1])] = json.loads(f.read_text())["node"]
        except (ValueError, OSError):  # written atomically, so only a vanishing file
            continue
    started = {int(f.stem.split("-")[1]) for f in (work / "rejects").glob("shard-*.jsonl")}
    return done, started - set(done)


def _restart_worker(cluster: LocalRay, hide=()) -> None:
    cluster.kill_node("node2")
    cluster.wait_nodes(1)
    cluster.start_node("node2", hide=hide)
    cluster.wait_nodes(2)


def test_two_nodes_run_shards_and_write_the_local_backends_bytes(ray_cluster, cluster_inputs,
                                                                 local_preprocess_run):
    out = cluster_inputs / "ray"
    done = subprocess.run(_on_ray(ray_cluster, cluster_inputs, out), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = summary(out)
    assert facts["backend"] == "ray" and facts["shards"] >= 30
    nodes = facts["shard_nodes"]
    assert len(nodes) == facts["shards"] and set(nodes) == {"node1", "node2"}, nodes
    assert set(summary(local_preprocess_run)["shard_nodes"]) == {socket.gethostname()}
    assert set(map(tuple, facts["shard_gpus"])) == {()}  # embedded: CPU actors
    assert_identical(local_preprocess_run, out)


def test_a_worker_node_lost_mid_run_is_retried_on_the_head(ray_cluster, cluster_inputs, local_preprocess_run):
    out = cluster_inputs / "ray-node-lost"
    driver = subprocess.Popen(_on_ray(ray_cluster, cluster_inputs, out), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        # Kill once node2 has finished shards and both actors are mid-shard.
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            assert driver.poll() is None, "the run ended before node2 could be killed"
            assert time.monotonic() < deadline, "node2 never ran a shard"
            done, in_flight = _shards(out / ".work")
            if list(done.values()).count("node2") >= 2 and len(in_flight) == 2:
                break
            time.sleep(0.02)
        assert ray_cluster.kill_node("node2")
        output, _ = driver.communicate(timeout=RUN_TIMEOUT)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-3000:]
    nodes = summary(out)["shard_nodes"]
    # Both shards in flight at the kill (one of them node2's) were finished by the head.
    assert all(nodes[i] == "node1" for i in in_flight), (in_flight, nodes)
    assert "node2" in nodes
    assert_identical(local_preprocess_run, out)
    _restart_worker(ray_cluster)


@pytest.mark.parametrize("missing", ["input", "output"])
def test_a_node_without_the_shared_path_is_a_named_error_and_a_rerun_resumes(
        ray_cluster, cluster_inputs, local_preprocess_run, missing):
    out = cluster_inputs / f"ray-no-{missing}"
    out.mkdir()
    hidden = cluster_inputs / "in" if missing == "input" else out
    _restart_worker(ray_cluster, hide=[str(hidden)])
    try:
        failed = subprocess.run(_on_ray(ray_cluster, cluster_inputs, out), capture_output=True,
                                text=True, timeout=RUN_TIMEOUT)
    finally:
        _restart_worker(ray_cluster)
    assert failed.returncode == 2, failed.stderr[-3000:]
    error = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, failed.stderr[-3000:]
    assert "failed on node node2" in error[0] and "shared file system" in error[0], error[0]
    if missing == "input":
        assert "FileNotFoundError" in error[0] and str(cluster_inputs / "in") in error[0], error[0]
    else:
        assert "OSError" in error[0] and "Read-only file system" in error[0], error[0]
        assert str(out / ".work") in error[0], error[0]
    _nothing_published(out)
    finished = len(_shards(out / ".work")[0])  # by the head, before node2's failure stopped it

    again = subprocess.run(_on_ray(ray_cluster, cluster_inputs, out), capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert summary(out)["shards_resumed"] == finished
    assert_identical(local_preprocess_run, out)


def test_the_whole_cluster_lost_publishes_nothing_and_a_rerun_resumes(ray_cluster, cluster_inputs,
                                                                      local_preprocess_run):
    out = cluster_inputs / "ray-cluster-lost"
    driver = subprocess.Popen(_on_ray(ray_cluster, cluster_inputs, out), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while len(_shards(out / ".work")[0]) < 4:
            assert driver.poll() is None and time.monotonic() < deadline, "no shard finished"
            time.sleep(0.02)
        for node in ray_cluster.nodes:  # the driver runs on the head: it goes too
            ray_cluster.kill_node(node)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode != 0
    finished = len(_shards(out / ".work")[0])
    _nothing_published(out)

    ray_cluster.start_node("node1")
    ray_cluster.start_node("node2")
    ray_cluster.wait_nodes(2)
    again = subprocess.run(_on_ray(ray_cluster, cluster_inputs, out), capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert summary(out)["shards_resumed"] == finished >= 4
    assert_identical(local_preprocess_run, out)


@pytest.fixture(scope="module")
def hf_model(cluster_inputs) -> Path:
    """A tiny random-init BERT classifier with the shipped tokenizer, saved locally."""
    pytest.importorskip("transformers")
    import torch
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(REPO / "megatron_srp" / "assets" / "tokenizer" / "tokenizer.json"),
        pad_token="<|pad|>")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                     id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1},
                     pad_token_id=tokenizer.pad_token_id)
    model = BertForSequenceClassification(cfg)
    torch.nn.init.normal_(model.classifier.weight, std=2.0)  # some segments unsafe
    out = cluster_inputs / "hf-classifier"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_the_hf_classifier_runs_one_actor_per_gpu(ray_cluster, cluster_inputs, hf_model):
    hf = ["--classifier", "hf", "--classifier-option", f"model_dir={hf_model}",
          "--classifier-option", "device=cpu", "--shard-mb", "0.2"]
    local = cluster_inputs / "local-hf"
    done = subprocess.run([*args(cluster_inputs, local), *hf, "--workers", "1"],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = cluster_inputs / "ray-hf"
    done = subprocess.run(ray_cluster.command([*args(cluster_inputs, out), *hf, "--backend", "ray",
                                               "--workers", "4", "--ray-address",
                                               ray_cluster.address]),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = summary(out)
    assert facts["unsafe_segments"] > 0 and facts["segments"] > facts["unsafe_segments"]
    assert set(facts["shard_nodes"]) == {"node1", "node2"}, facts["shard_nodes"]
    assert all(gpus == ["0"] for gpus in facts["shard_gpus"]), facts["shard_gpus"]
    assert_identical(local, out)
