"""A throwaway Ray cluster on this machine: a head and a worker node, each in its own network
namespace (:class:`megatron_srp.deploy.netns.Nodes`), joined by a veth pair.

``ray start --head`` runs on ``node1``, ``ray start --address`` on ``node2``; each node has its
own address, host name and Ray temp directory, so tasks really cross nodes: the driver (run on
the head, as on a real cluster) reaches the worker's raylet and object store over the veth
pair. The rest of the file system is shared by both, as a cluster's shared file system is; a
node can be started with paths hidden, to play a node that does not mount it.
:meth:`kill_node` SIGKILLs every process of a node, as a machine that loses power.

    with LocalRay(Path("/tmp/raycluster")) as cluster:
        subprocess.run(cluster.command(["python", "tools/preprocess_srp.py", "--backend", "ray",
                                        "--ray-address", cluster.address, ...]))

Never run ``ray stop`` beside it: that ends every Ray process on the machine, whatever its
namespace. Needs root and iproute2/util-linux (:class:`Unavailable` otherwise).
"""
from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Mapping, Optional, Sequence

from megatron_srp.deploy.netns import Nodes, Unavailable, until, wait_gone

SUBNET = "10.213.78"
GCS_PORT = 6379
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # per node; Ray's floor is 75 MiB
# The head notices a dead node after 3 missed 1-second health checks (Ray's defaults: 5 x 3 s).
HEAD_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_timeout_ms": "1000"}
COMMON_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
AUTH_TOKEN_FILE = "auth_token"  # Ray's token authentication, as a real cluster uses it


class LocalRay:
    """Start with :meth:`start` (or ``with``); run drivers with :meth:`command`; end with
    :meth:`stop`, which SIGKILLs every process of every node and removes the namespaces."""

    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 1,
                 gpus_per_node: int = 0, python: str = sys.executable) -> None:
        """``gpus_per_node`` is what each node declares to Ray (``ray start --num-gpus``),
        whether or not the machine has them: tasks that ask for GPUs are placed by it."""
        self.net = Nodes(root, nodes, SUBNET, prefix="srpray")
        self.root = self.net.root
        self.cpus, self.gpus = cpus_per_node, gpus_per_node
        self.bin = Path(python).parent
        self.head = self.net.names[0]
        self.starts: dict[str, int] = {}
        self.env = {**COMMON_ENV, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(self.root / AUTH_TOKEN_FILE)}

    @property
    def nodes(self) -> list[str]:
        return self.net.names

    @property
    def address(self) -> str:
        """The head's GCS address, for ``ray.init(address=...)`` / ``--ray-address``."""
        return f"{self.net.addr[self.head]}:{GCS_PORT}"

    def __enter__(self) -> "LocalRay":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 120) -> None:
        if not (self.bin / "ray").exists():
            raise Unavailable(f"no ray command beside {self.bin / 'python'} "
                              "(pip install 'megatron-srp[ray]')")
        try:
            self.net.create()
            token = self.root / AUTH_TOKEN_FILE
            token.write_text(secrets.token_hex(32) + "\n")
            token.chmod(0o600)
            for node in self.nodes:
                self.start_node(node)
            self.wait_nodes(len(self.nodes), timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.net.delete()
        left = wait_gone([pid for node in self.nodes for pid in self.net.pids(node)])
        if left:
            raise RuntimeError(f"processes of the local Ray cluster survived SIGKILL: {left}")
        shutil.rmtree(self._temp_root(), ignore_errors=True)

    # -- nodes ----------------------------------------------------------------------------
    def start_node(self, node: str, hide: Sequence[str] = (), timeout: float = 90) -> None:
        """``ray start`` on ``node`` (the head on the first node); ``hide`` covers those paths
        with an empty read-only file system on that node."""
        self.starts[node] = self.starts.get(node, 0) + 1
        temp = self._temp_root() / f"{node}-{self.starts[node]}"
        temp.mkdir(parents=True, exist_ok=True)
        args = [str(self.bin / "ray"), "start", f"--node-ip-address={self.net.addr[node]}",
                f"--num-cpus={self.cpus}", f"--num-gpus={self.gpus}", f"--temp-dir={temp}",
                f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]
        if node == self.head:
            args += ["--head", f"--port={GCS_PORT}", "--include-dashboard=false"]
        else:
            args += [f"--address={self.address}"]
        env = {**self.env, **(HEAD_ENV if node == self.head else {})}
        log = self.root / f"ray-start-{node}-{self.starts[node]}.log"
        with open(log, "w") as out:
            done = subprocess.run(self.net.command(args, node, env, hide), stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        if done.returncode != 0:
            raise Unavailable(f"ray start on {node} failed ({done.returncode}): "
                              + log.read_text(errors="replace")[-1500:])

    def kill_node(self, node: str) -> list[int]:
        """SIGKILL every process of ``node`` (raylet, its workers, anything run there)."""
        victims = self.net.kill(node)
        left = wait_gone(victims)
        if left:
            raise RuntimeError(f"{node}: processes survived SIGKILL: {left}")
        return victims

    def alive_nodes(self) -> int:
        """How many nodes the head counts as alive (asked from a driver on the head)."""
        probe = ("import ray; ray.init(address=%r, log_to_driver=False, configure_logging=False);"
                 "print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))" % self.address)
        done = subprocess.run(self.command([str(self.bin / "python"), "-c", probe]),
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise Unavailable(f"cannot reach the Ray head at {self.address}: "
                              + done.stderr[-1500:])
        counts = [line.split(":")[1] for line in done.stdout.splitlines()
                  if line.startswith("alive nodes:")]
        return int(counts[-1])

    def wait_nodes(self, count: int, timeout: float = 90) -> None:
        until(lambda: self.alive_nodes() == count, timeout,
              lambda: f"the Ray cluster never had {count} live nodes: "
              + "".join((p.read_text(errors="replace")[-600:])
                        for p in sorted(self.root.glob("ray-start-*.log"))), every=1.0)

    # -- running on it --------------------------------------------------------------------
    def command(self, args: Sequence[str], node: Optional[str] = None,
                env: Mapping[str, str] = {}) -> list[str]:
        """``args`` as a command run on ``node`` (default: the head)."""
        return self.net.command(args, node or self.head, {**self.env, **env})

    def _temp_root(self) -> Path:
        # Ray's sockets live under its temp dir, and a socket path may not exceed 107 bytes.
        return Path("/tmp") / f"srpray-{self.net.netns[self.head].split('-')[0]}"


def hold(cluster: LocalRay, info: Path) -> dict:
    """Start ``cluster``, write ``info`` (its address and the command prefix that runs a driver
    on its head), keep it up until SIGINT or SIGTERM, then stop it. For trying things and for
    benchmarks that time drivers against a cluster that is already up (tools/local_ray.py)."""
    stopped = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stopped.set())
                for s in (signal.SIGINT, signal.SIGTERM)}
    cluster.start()
    try:
        facts = {"address": cluster.address, "nodes": cluster.nodes,
                 "cpus_per_node": cluster.cpus, "gpus_per_node": cluster.gpus,
                 "driver": cluster.command([])}
        info.write_text(json.dumps(facts, indent=2) + "\n")
        print(f"Ray cluster up: {len(cluster.nodes)} node(s), {cluster.cpus} CPU(s) each, at "
              f"{cluster.address}; run a driver on its head with the prefix in {info}; "
              "Ctrl-C stops it", flush=True)
        stopped.wait()
    finally:
        info.unlink(missing_ok=True)
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return facts
