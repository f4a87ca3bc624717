"""Throwaway "nodes" on this machine: one network namespace each, joined by a veth pair.

The local clusters (:mod:`local_slurm`, :mod:`local_ray`) are built on this. Every node has
its own address on a private subnet that exists only inside the namespaces, its own host name
and its own mount namespace (where the cluster's hosts file is bound over /etc/hosts, and
where paths can be hidden to play a node that does not see a shared file system). Processes
started in a node are found again through the namespace, so a node can be killed whole, as a
machine that loses power is.

Needs root, ``ip`` (iproute2), ``nsenter`` and ``unshare`` (util-linux). :class:`Unavailable`
says why the nodes cannot be made here, so tests can skip with that reason.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence


class Unavailable(RuntimeError):
    """A local cluster cannot run on this machine; the message says why."""


class Nodes:
    """``count`` nodes (``node1``, ``node2``) named ``<prefix><pid>-nodeN`` in ``ip netns``.

    :meth:`create` makes them, :meth:`command` wraps a command to run on one, :meth:`kill`
    SIGKILLs every process of one, :meth:`delete` kills everything and removes them.
    """

    def __init__(self, root: Path, count: int, subnet: str, prefix: str) -> None:
        if count not in (1, 2):
            raise ValueError(f"nodes must be 1 or 2, not {count}")
        self.root = Path(root).resolve()
        self.names = [f"node{i + 1}" for i in range(count)]
        tag = f"{os.getpid() % 100000}"
        self.netns = {n: f"{prefix}{tag}-{n}" for n in self.names}
        self.addr = {n: f"{subnet}.{i + 1}" for i, n in enumerate(self.names)}
        self.hosts = self.root / "hosts"

    def create(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("local cluster nodes need root (network namespaces)")
        self.root.mkdir(parents=True, exist_ok=True)
        for ns in self.netns.values():
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        hosts = ["127.0.0.1 localhost"] + [f"{a} {n}" for n, a in self.addr.items()]
        self.hosts.write_text("\n".join(hosts) + "\n")
        if len(self.names) == 2:
            a, b = (self.netns[n] for n in self.names)
            _ip("link", "add", "srpveth1", "netns", a, "type", "veth", "peer", "name",
                "srpveth2", "netns", b)
            for i, (node, ns) in enumerate(self.netns.items()):
                dev = f"srpveth{i + 1}"
                _ip("-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
        else:  # one node: its address on the loopback device
            ns = self.netns[self.names[0]]
            _ip("-n", ns, "addr", "add", f"{self.addr[self.names[0]]}/32", "dev", "lo")

    def command(self, args: Sequence[str], node: str, env: Mapping[str, str] = {},
                hide: Sequence[str] = ()) -> list[str]:
        """``args`` as a command run on ``node`` with ``env`` added; each path in ``hide`` is
        covered by an empty directory there (a file system this node does not mount)."""
        hidden = "".join(f"mount -t tmpfs -o ro,size=1m srp-hidden {shlex.quote(p)} && "
                         for p in hide)
        setup = (f"mount --bind {shlex.quote(str(self.hosts))} /etc/hosts && {hidden}"
                 f'hostname {node} && exec "$@"')
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--mount",
                "--uts", "sh", "-c", setup, "sh", "env",
                *(f"{k}={v}" for k, v in env.items()), *args]

    def pids(self, node: str) -> list[int]:
        """Every process running in ``node``'s network namespace."""
        done = subprocess.run(["ip", "netns", "pids", self.netns[node]], capture_output=True,
                              text=True)
        return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []

    def process_names(self, node: str) -> dict[int, str]:
        names = {}
        for pid in self.pids(node):
            try:
                names[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
        return names

    def kill(self, node: str, exclude: Sequence[str] = ()) -> list[int]:
        """SIGKILL every process of ``node`` whose name is not in ``exclude``; their pids."""
        victims = [pid for pid, name in self.process_names(node).items() if name not in exclude]
        for pid in victims:
            kill_pid(pid)
        return victims

    def delete(self) -> None:
        for node, ns in self.netns.items():
            self.kill(node)
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


def until(condition, timeout: float, message, error: type = Unavailable,
          every: float = 0.3) -> None:
    """Poll ``condition``; past ``timeout``, raise ``error(message())``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise error(message())
        time.sleep(every)


def wait_gone(pids: Sequence[int], timeout: float = 10) -> list[int]:
    """The pids still alive after ``timeout`` seconds (zombies count as gone)."""
    def alive() -> list[int]:
        left = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                left.append(pid)
        return left
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive()


__all__ = ["Nodes", "Unavailable", "kill_pid", "until", "wait_gone"]
