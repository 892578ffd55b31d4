"""Start and stop a local Ray cluster (head node) that outlives one command: the target of
detached Ray jobs on this machine, and the cluster the tests share.

    python -m vidscale.cluster.ray_cluster up [--num-cpus N] [--dir DIR]   # prints RAY_ADDRESS=http://...
    python -m vidscale.cluster.ray_cluster down [--dir DIR]                # stops only that cluster

The head runs as `ray start --head --block` in its own process group, bound to 127.0.0.1
(node address and dashboard / job server); `down` sends that process SIGTERM, which drains
and stops every process of this cluster, and nothing else (`ray stop` would stop every Ray
cluster on the machine). Jobs run the Python that `ray start` saw: this venv's.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DIR = "/tmp/vidscale-ray"  # short: Ray's socket paths live under it (108-byte limit)


@dataclass
class RayHead:
    pid: int
    gcs_address: str
    """host:port for ray.init(address=...)."""
    dashboard: str
    """http://host:port of the dashboard and job server (JobSubmissionClient)."""
    dir: str

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _side_ports() -> list[str]:
    """Ray's fixed default ports (agent 52365, client server 10001, ...) collide with any
    other Ray on the machine: the loser's job agent stays down ("No available agent to
    submit job"). Give every side service a free port."""
    return [f"--{name}={_free_port()}" for name in
            ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]


def _state_file(dir: str | Path) -> Path:
    return Path(dir) / "head.json"


def read_head(dir: str | Path = DEFAULT_DIR) -> RayHead | None:
    p = _state_file(dir)
    if not p.is_file():
        return None
    head = RayHead(**json.loads(p.read_text()))
    return head if head.alive() else None


def _dashboard_up(url: str) -> bool:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url + "/api/version", timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        return e.code == 401  # up, with token authentication (Ray's default once a token exists)
    except OSError:
        return False


def use_token_auth() -> None:
    """Ray 2.5x+ turns token authentication on for new local clusters and writes
    ~/.ray/auth_token; its job client only sends the token when RAY_AUTH_MODE=token. Set it
    when a token exists and the user has not chosen a mode."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def start_head(num_cpus: int = 4, num_gpus: int = 0, dir: str | Path = DEFAULT_DIR,
               timeout_s: float = 90) -> RayHead:
    """A running head recorded in DIR is reused; otherwise start one and wait for its job server."""
    head = read_head(dir)
    if head is not None and _dashboard_up(head.dashboard):
        return head
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    port, dash = _free_port(), _free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log = open(dir / "head.log", "w")
    proc = subprocess.Popen(
        [str(Path(bin_dir) / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--temp-dir={dir / 'tmp'}",
         "--disable-usage-stats", *_side_ports()],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = RayHead(pid=proc.pid, gcs_address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dash}",
                   dir=str(dir))
    _state_file(dir).write_text(json.dumps(asdict(head)))
    deadline = time.monotonic() + timeout_s
    while not _dashboard_up(head.dashboard):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            tail = "\n".join((dir / "head.log").read_text(errors="replace").splitlines()[-10:])
            raise RuntimeError(f"the Ray head did not start (log {dir / 'head.log'}):\n{tail}")
        time.sleep(0.5)
    return head


def stop_head(head: RayHead | None = None, dir: str | Path = DEFAULT_DIR, timeout_s: float = 40) -> bool:
    """Stop the head started by `start_head` (its whole process group). True if one was running."""
    head = head or read_head(dir)
    if head is None:
        return False
    try:
        os.kill(head.pid, signal.SIGTERM)  # `ray start --block` drains and stops its processes
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while head.alive() and time.monotonic() < deadline:
        try:
            os.waitpid(head.pid, os.WNOHANG)  # reap it when it is our child
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:  # anything of this cluster that outlived the head: same process group
        os.killpg(head.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _state_file(head.dir).unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidscale.cluster.ray_cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 1))
    p.add_argument("--num-gpus", type=int, default=0)
    p.add_argument("--dir", default=DEFAULT_DIR)
    a = p.parse_args(argv)
    if a.action == "up":
        head = start_head(a.num_cpus, a.num_gpus, a.dir)
        print(f"RAY_ADDRESS={head.dashboard}")
        print(f"# ray.init(address='{head.gcs_address}'); stop with: python -m vidscale.cluster.ray_cluster down --dir {a.dir}",
              file=sys.stderr)
        return 0
    print("stopped" if stop_head(dir=a.dir) else "no Ray head recorded in " + a.dir)
    return 0


class EmbeddedRay:
    """A local Ray head started here (127.0.0.1) and stopped here; runs connect by address."""

    def __init__(self, cpus: int):
        self.cpus = cpus

    def __enter__(self) -> str:
        import ray
        ray.init(num_cpus=self.cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level="WARNING")
        return ray.get_runtime_context().gcs_address

    def __exit__(self, *exc) -> None:
        import ray
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

