"""A throwaway Slurm cluster on this machine, for running the sbatch scripts for real.

Each node is a network namespace with its own host name (``node1``, ``node2``), joined to the
other by a veth pair on a private subnet that exists only inside those namespaces. Every node
runs its own ``slurmd``; ``slurmctld`` runs on ``node1``; one ``munged`` serves all of them
through a socket in the cluster's directory. A job's ranks therefore really talk across
nodes (torchrun's c10d rendezvous, gloo), while everything stays on this machine.

The nodes are :class:`megatron_srp.deploy.netns.Nodes`. Needs root, ``ip`` (iproute2),
``nsenter`` and ``unshare`` (util-linux), and Debian's ``slurm-wlm`` and ``munge``
(``ensure_installed`` installs them with apt-get). :class:`Unavailable` says why a cluster
cannot start here, so tests can skip with that reason.

    with LocalSlurm(Path("/tmp/cluster"), nodes=2) as cluster:
        job = cluster.sbatch(["--nodes=2", "examples/slurm/pretrain.sbatch", CONFIG])
        cluster.wait(job)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_srp.deploy.netns import Nodes, Unavailable, until

SUBNET = "10.213.77"
CTLD_PORT, SLURMD_PORT = 16817, 16818
CRED_EXPIRE_S = 10  # a requeued job starts again about this long after its stop
DAEMONS = ("slurmd", "slurmctld", "slurmstepd", "slurmscriptd")
TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "ip", "unshare", "nsenter")
DEBIAN_PACKAGES = ("slurm-wlm", "munge")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


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
        self.net = Nodes(root, nodes, SUBNET, prefix="srp")
        self.root = self.net.root
        self.nodes, self.netns, self.addr = self.net.names, self.net.netns, self.net.addr
        self.cpus = cpus_per_node
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
            self.net.create()
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
        for node in self.nodes:  # every job process first, then the daemons
            self.net.kill(node)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self._procs.clear()
        self.net.delete()

    # -- using it -------------------------------------------------------------------------
    def command(self, args: Sequence[str], node: Optional[str] = None) -> list[str]:
        """``args`` as a command run on ``node`` (default: the first) with this cluster's
        configuration."""
        return self.net.command(args, node or self.nodes[0], {"SLURM_CONF": str(self.conf)})

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

    def node_pids(self, node: str, exclude: Sequence[str] = DAEMONS) -> list[int]:
        """The processes running in ``node``'s namespace, less the Slurm daemons."""
        return [pid for pid, name in self.net.process_names(node).items()
                if name not in exclude]

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
        until(lambda: self.munge_socket.exists(), 15, lambda: "munged did not create its "
               "socket: " + (d / "munged.stderr").read_text(errors="replace")[-500:])

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
        until(idle, timeout, lambda: "the nodes never became idle: "
              + self.log("slurmctld.log")[-800:])
