"""The multi-host test bed itself (cluster/scripts/hosts.sh): hosts reach each other over
their own addresses and nothing else, the bridge counts what crosses, and `down` leaves no
namespace behind."""
import subprocess
import sys

import pytest

from vidscale.cluster.hosts import TestBed, prefix

from conftest import wait_for  # noqa: E402

pytestmark = pytest.mark.cluster

ECHO = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 7700)); s.listen(); print("ready", flush=True)
c, addr = s.accept(); n = 0
while chunk := c.recv(65536): n += len(chunk)
print(addr[0], n, flush=True)
"""
SEND = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7700), timeout=10); c.sendall(b"x" * int(sys.argv[2])); c.close()
"""


def namespaces() -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.splitlines() if line.strip()}


def test_hosts_talk_over_their_link_and_the_bridge_counts_it(hosts3):
    bed = hosts3
    server = bed.popen("h1", [sys.executable, "-c", ECHO, bed.address("h1")], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    before = bed.tx_bytes()
    r = bed.run("h3", [sys.executable, "-c", SEND, bed.address("h1"), 200_000], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    peer, n = server.stdout.readline().split()
    server.wait(10)
    assert peer == bed.address("h3") and int(n) == 200_000  # the sender's own address, not loopback
    after = bed.tx_bytes()
    sent = {h: after[h] - before[h] for h in bed.hosts}
    assert 200_000 <= sent["h3"] < 200_000 * 1.2  # payload plus TCP/IP headers
    assert sent["h2"] < 2_000  # a bystander sends next to nothing


def test_a_host_reaches_no_network_outside_the_bed(hosts2):
    r = hosts2.run("h2", [sys.executable, "-c", "import socket; socket.create_connection(('1.1.1.1', 53), timeout=3)"],
                   capture_output=True, text=True)
    assert r.returncode != 0 and "unreachable" in r.stderr.lower()
    r = hosts2.run("h2", ["ip", "-o", "link"], capture_output=True, text=True)
    assert sorted(line.split(":")[1].strip().split("@")[0] for line in r.stdout.splitlines()) == ["eth0", "lo"]


def test_kill_stops_every_process_of_a_host_and_down_removes_the_bed():
    bed = TestBed(2).up()
    try:
        ours = {f"{prefix()}-h1", f"{prefix()}-h2", f"{prefix()}-br"}
        assert ours <= namespaces()
        sleepers = [bed.popen("h2", ["sleep", "600"]) for _ in range(2)]
        # a child is in h2 once nsenter has run in it: under load that is a moment after Popen
        wait_for(lambda: len(bed.pids("h2")) == 2, 30, "both sleepers inside h2")
        assert bed.pids("h1") == []
        bed.kill("h2")
        assert all(p.wait(10) == -9 for p in sleepers)
        bed.popen("h1", ["sleep", "600"])  # still running when the bed goes down
        TestBed(2).up()  # a new bed over a left-over one replaces it
    finally:
        bed.down()
    assert not ours & namespaces()
