"""A throwaway Slurm cluster on this machine, for running the sbatch scripts for real.

Each node is a network namespace with its own host name (``node1``, ``node2``), joined to the
other by a veth pair on a private subnet that exists only inside those namespaces. Every node
runs its own ``slurmd``; ``slurmctld`` runs on ``node1``; one ``munged`` serves all of them
through a socket in the cluster's directory. A job's ranks therefore really talk across
nodes (torchrun's c10d rendezvous, gloo), while everything stays on this machine.

Needs root, ``ip`` (iproute2), ``nsenter`` and ``unshare`` (util-linux), and Debian's
``slurm-wlm`` and ``munge`` (``ensure_installed`` installs them with apt-get). Each node also
has its own mount namespace, where the cluster's hosts file is bound over /etc/hosts. :class:`Unavailable` says why a
cluster cannot start here, so tests can skip with that reason.

    with LocalSlurm(Path("/tmp/cluster"), nodes=2) as cluster:
        job = cluster.sbatch(["--nodes=2", "examples/slurm/pretrain.sbatch", CONFIG])
        cluster.wait(job)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

SUBNET = "10.213.77"
CTLD_PORT, SLURMD_PORT = 16817, 16818
CRED_EXPIRE_S = 10  # a requeued job starts again about this long after its stop
TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "ip", "unshare", "nsenter")
DEBIAN_PACKAGES = ("slurm-wlm", "munge")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class Unavailable(RuntimeError):
    """A local cluster cannot run on this machine; the message says why."""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None
            and not Path("/usr/sbin", t).exists()]


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt-get where they are missing (root only)."""
    if not missing_tools():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"missing {', '.join(missing_tools())}, and apt-get as root is not "
                          "available to install slurm-wlm and munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", *DEBIAN_PACKAGES, "iproute2", "util-linux"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    if missing_tools():
        raise Unavailable(f"still missing after apt-get: {', '.join(missing_tools())}")


class LocalSlurm:
    """Start with :meth:`start` (or ``with``), submit with :meth:`sbatch`, end with
    :meth:`stop`, which ends every process the cluster started and removes its namespaces."""

    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2) -> None:
        if nodes not in (1, 2):
            raise ValueError(f"nodes must be 1 or 2, not {nodes}")
        self.root = Path(root).resolve()
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        tag = f"{os.getpid() % 100000}"
        self.netns = {n: f"srp{tag}-{n}" for n in self.nodes}
        self.addr = {n: f"{SUBNET}.{i + 1}" for i, n in enumerate(self.nodes)}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: list[subprocess.Popen] = []

    # -- life cycle -----------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 90) -> None:
        if os.geteuid() != 0:
            raise Unavailable("a local Slurm cluster needs root (network namespaces, slurmd)")
        if missing_tools():
            raise Unavailable(f"missing {', '.join(missing_tools())} (apt-get install "
                              f"{' '.join(DEBIAN_PACKAGES)})")
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._make_network()
            self._write_conf()
            self._spawn(self.nodes[0], ["slurmctld", "-D", "-i", "-f", str(self.conf)],
                        "slurmctld.stdout")
            for node in self.nodes:
                self._spawn(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)],
                            f"slurmd-{node}.stdout")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for ns in self.netns.values():  # every job process first, then the daemons
            for pid in self._netns_pids(ns):
                _kill(pid)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self._procs.clear()
        for ns in self.netns.values():
            for pid in self._netns_pids(ns):
                _kill(pid)
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)

    # -- using it -------------------------------------------------------------------------
    def command(self, args: Sequence[str], node: Optional[str] = None) -> list[str]:
        """``args`` as a command run on ``node`` (default: the first) with this cluster's
        configuration."""
        node = node or self.nodes[0]
        hosts = self.root / "hosts"
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--mount",
                "--uts", "sh", "-c",
                f'mount --bind {hosts} /etc/hosts && hostname {node} && exec "$@"', "sh",
                "env", f"SLURM_CONF={self.conf}", *args]

    def run(self, args: Sequence[str], node: Optional[str] = None, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(args, node), capture_output=True, text=True, **kw)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): "
                               f"{done.stderr.strip()}")
        return done

    def sbatch(self, args: Sequence[str], env: Optional[dict] = None) -> int:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], env=env).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, NodeList, ExitCode, ...)."""
        text = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: int, states: Sequence[str] = tuple(FINISHED), timeout: float = 600,
             condition=None) -> dict[str, str]:
        """Poll until the job is in one of ``states`` (and ``condition(job)`` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states and (condition is None or condition(info)):
                return info
            if info.get("JobState") in FINISHED and info.get("JobState") not in states:
                raise RuntimeError(f"job {job_id} ended {info.get('JobState')}: {info}")
            if info.get("JobState") in states and condition is not None \
                    and info.get("JobState") in FINISHED:
                raise RuntimeError(f"job {job_id} ended {info.get('JobState')} without "
                                   f"the awaited condition: {info}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after "
                                   f"{timeout:.0f} s: {info}")
            time.sleep(0.5)

    def node_pids(self, node: str, exclude: Sequence[str] = ("slurmd", "slurmctld",
                                                             "slurmstepd")) -> list[int]:
        """The processes running in ``node``'s namespace, less the Slurm daemons."""
        pids = []
        for pid in self._netns_pids(self.netns[node]):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if name not in exclude:
                pids.append(pid)
        return pids

    def log(self, name: str) -> str:
        p = self.root / name
        return p.read_text(errors="replace") if p.exists() else ""

    # -- pieces ---------------------------------------------------------------------------
    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        key = d / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        cmd = ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
               f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
               f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"]
        self._procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                            stderr=open(d / "munged.stderr", "w")))
        _until(lambda: self.munge_socket.exists(), 15, lambda: "munged did not create its "
               "socket: " + (d / "munged.stderr").read_text(errors="replace")[-500:])

    def _make_network(self) -> None:
        for node, ns in self.netns.items():
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        hosts = ["127.0.0.1 localhost"] + [f"{a} {n}" for n, a in self.addr.items()]
        (self.root / "hosts").write_text("\n".join(hosts) + "\n")
        if len(self.nodes) == 2:
            a, b = (self.netns[n] for n in self.nodes)
            _ip("link", "add", "srpveth1", "netns", a, "type", "veth", "peer", "name",
                "srpveth2", "netns", b)
            for i, (node, ns) in enumerate(self.netns.items()):
                dev = f"srpveth{i + 1}"
                _ip("-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
        else:  # one node: its address on the loopback device
            ns = self.netns[self.nodes[0]]
            _ip("-n", ns, "addr", "add", f"{self.addr[self.nodes[0]]}/32", "dev", "lo")

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("ctld", *(f"spool/{n}" for n in self.nodes)):
            (r / sub).mkdir(parents=True, exist_ok=True)
        head = self.nodes[0]
        lines = [
            "ClusterName=srplocal",
            f"SlurmctldHost={head}({self.addr[head]})",
            f"SlurmctldPort={CTLD_PORT}", f"SlurmdPort={SLURMD_PORT}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire: how long a requeued job waits before it may start again (its old
            # credential must expire first; 120 s by default). Releasing it earlier by hand
            # races the revoked credential ("Job credential revoked").
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={r / 'ctld'}", f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "MpiDefault=none", "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2", "JobRequeue=1", "KillWait=30", "MinJobAge=3600",
            "SlurmdTimeout=30", "InactiveLimit=0", "MessageTimeout=20",
            *(f"NodeName={n} NodeAddr={self.addr[n]} CPUs={self.cpus} State=UNKNOWN"
              for n in self.nodes),
            "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, node: str, args: list[str], log: str) -> None:
        out = open(self.root / log, "w")
        self._procs.append(subprocess.Popen(self.command(args, node), stdout=out,
                                            stderr=subprocess.STDOUT,
                                            start_new_session=True))

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise Unavailable(f"a Slurm daemon exited ({proc.args[-4:]}): "
                                      + self.log("slurmctld.log")[-800:]
                                      + "".join(self.log(f"slurmd-{n}.log")[-800:]
                                                for n in self.nodes))
            done = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
            states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
            return done.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)
        _until(idle, timeout, lambda: "the nodes never became idle: "
               + self.log("slurmctld.log")[-800:])

    @staticmethod
    def _netns_pids(ns: str) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _until(condition, timeout: float, message) -> None:
    """Poll ``condition``; past ``timeout``, raise Unavailable with ``message()``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise Unavailable(message())
        time.sleep(0.3)
