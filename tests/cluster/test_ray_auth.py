"""Who can reach the Ray clusters vidscale starts: only this user's processes that hold the
job's token, and only from this machine (every Ray server listens on 127.0.0.1)."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from vidscale.cluster.ray_cluster import LOCAL_ONLY

from conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.cluster

CLIENT = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
          "print('CONNECTED', ray.cluster_resources().get('CPU'))")


def client(address: str, home: Path, **auth) -> subprocess.CompletedProcess:
    """A Ray client on this machine with only the authentication settings given (no
    ~/.ray/auth_token); like vidscale's clients, it joins a 127.0.0.1 cluster as a local node."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(HOME=str(home), **LOCAL_ONLY, **auth)
    return subprocess.run([sys.executable, "-c", CLIENT, address], env=env, capture_output=True, text=True,
                          timeout=120)


def listening(root_pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of `root_pid`'s processes."""
    out = []
    for p in [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]:
        try:
            out += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return out


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_head_requires_its_token_and_listens_on_localhost_only(ray_cluster, tmp_path):
    token = Path(ray_cluster.token)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    gcs = [p for p in psutil.Process(ray_cluster.pid).children(recursive=True) if p.name() == "gcs_server"]
    assert gcs and gcs[0].environ()["RAY_AUTH_MODE"] == "token"
    socks = listening(ray_cluster.pid)
    assert socks and all(ip in LOOPBACK for _, ip, _ in socks), socks
    refused = client(ray_cluster.gcs_address, tmp_path)
    assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, refused.stderr[-2000:]
    wrong = client(ray_cluster.gcs_address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    assert wrong.returncode != 0 and "AuthenticationError" in wrong.stderr, wrong.stderr[-2000:]
    ok = client(ray_cluster.gcs_address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    assert ok.returncode == 0 and "CONNECTED" in ok.stdout, ok.stderr[-2000:]


EMBEDDED = """
import json, os, subprocess, sys
import psutil
from vidscale.cluster.ray_cluster import EmbeddedRay
with EmbeddedRay(1) as address:
    socks = []
    for p in psutil.Process().children(recursive=True):
        try:
            socks += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    token = os.environ["RAY_AUTH_TOKEN_PATH"]
    print(json.dumps({"address": address, "socks": socks, "token": token,
                      "mode": oct(os.stat(token).st_mode & 0o777)}), flush=True)
    sys.stdin.readline()  # the test's clients run now
"""


def test_embedded_cluster_requires_a_token_and_listens_on_localhost_only(tmp_path):
    """What `make demo`'s sweep starts (scaling/study/runner.py: EmbeddedRay)."""
    proc = subprocess.Popen([sys.executable, "-c", EMBEDDED], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["address"].startswith("127.0.0.1:") and info["mode"] == "0o600"
        assert info["socks"] and all(ip in LOOPBACK for _, ip, _ in info["socks"]), info["socks"]
        refused = client(info["address"], tmp_path)
        assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, refused.stderr[-2000:]
        ok = client(info["address"], tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=info["token"])
        assert ok.returncode == 0 and "CONNECTED" in ok.stdout, ok.stderr[-2000:]
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
