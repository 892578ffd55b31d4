"""A test bed of several hosts on one machine (Linux network namespaces, root only), driven from
Python: what the multi-node tests and `vidscale bench hosts` stand on.

    with TestBed(2) as bed:                      # cluster/scripts/hosts.sh up 2 ... down
        p = bed.popen("h2", [python, "-c", ...])  # a process on host 2 (nsenter --net)
        bed.address("h1")                         # '10.250.0.1'
        bed.tx_bytes()                            # {'h1': ..., 'h2': ...} sent into the bed so far
        bed.kill("h2")                            # every process of host 2, as a node that dies

Each host has one interface, `eth0` (INTERFACE), on a bridge that lives in a namespace of its
own; the bridge's port counters say how many bytes each host sent to the others.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "scripts" / "hosts.sh"
INTERFACE = "eth0"
"""The name of every host's link to the others: what `cluster.network_interface` names."""


def prefix() -> str:
    return os.environ.get("VIDSCALE_HOSTS_PREFIX", "vs")


def subnet() -> str:
    return os.environ.get("VIDSCALE_HOSTS_SUBNET", "10.250.0")


class TestBed:
    """N hosts `h1..hN`; `up()` replaces a bed of the same prefix left by a killed session."""
    __test__ = False  # not a pytest class

    def __init__(self, n: int = 2):
        self.n = n
        self.hosts = [f"h{i}" for i in range(1, n + 1)]

    # -- lifetime ---------------------------------------------------------------------------------
    def up(self) -> "TestBed":
        if os.geteuid() != 0:
            raise PermissionError("the multi-host test bed needs root (network namespaces)")
        r = subprocess.run([str(SCRIPT), "up", str(self.n)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{SCRIPT} up {self.n} failed: {r.stderr.strip()[-2000:]}")
        return self

    def down(self) -> None:
        subprocess.run([str(SCRIPT), "down"], capture_output=True, text=True, timeout=120)

    def __enter__(self) -> "TestBed":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- hosts --------------------------------------------------------------------------------------
    def netns(self, host: str) -> str:
        self._check(host)
        return f"{prefix()}-{host}"

    def address(self, host: str) -> str:
        self._check(host)
        return f"{subnet()}.{host[1:]}"

    def enter(self, host: str) -> list[str]:
        """The command prefix that runs a program on `host` (keeps the machine's /sys and cgroups)."""
        return ["nsenter", f"--net=/run/netns/{self.netns(host)}"]

    def popen(self, host: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.enter(host) + [str(a) for a in argv], **kw)

    def run(self, host: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.enter(host) + [str(a) for a in argv], **kw)

    def pids(self, host: str) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.netns(host)], capture_output=True, text=True)
        return [int(x) for x in r.stdout.split()]

    def kill(self, host: str, sig: int = signal.SIGKILL) -> list[int]:
        """Every process of `host` at once, as when the node loses power; returns their pids."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def tx_bytes(self) -> dict[str, int]:
        """Bytes each host has sent to the bridge (every byte that left it for another host)."""
        r = subprocess.run(["ip", "-n", f"{prefix()}-br", "-s", "-j", "link", "show"], capture_output=True,
                           text=True, check=True)
        out = {}
        for link in json.loads(r.stdout):
            if link["ifname"] in self.hosts:  # the bridge's port hI receives what host I sends
                out[link["ifname"]] = int(link["stats64"]["rx"]["bytes"])
        return out

    def _check(self, host: str) -> None:
        if host not in self.hosts:
            raise ValueError(f"host {host!r}: the test bed has {', '.join(self.hosts)}")
