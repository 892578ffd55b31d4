"""A Ray cluster across hosts: the head on one node, workers joining it from the others, every
process of it requiring the project's token.

On real nodes (a shared filesystem holds DIR, or copy DIR/auth_token to every node):

    node 1$ python -m vidscale.cluster.ray_hosts head --address 10.0.0.1 --port 6379 --dir DIR
    node 2$ python -m vidscale.cluster.ray_hosts join --address 10.0.0.1:6379 --node-address 10.0.0.2 --dir DIR
    node 1$ RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=DIR/auth_token \\
              vidscale train RECIPE --launcher ray --address 10.0.0.1:6379 --nproc 8 \\
              --set cluster.network_interface=eth0

Both block like `ray start --block` (stop them with Ctrl-C or SIGTERM: only that node's Ray
processes stop). `head` generates the token into DIR/auth_token (mode 0600) unless one is
there; `join` reads it. Each node keeps its Ray session files in a directory of its own
(DIR/node-ADDRESS), so nodes that share DIR never share Ray's sockets. Unlike the local head
of `ray_cluster.py`, nothing is bound to 127.0.0.1: the node address is the one given, and
the dashboard / job server listens there too.

From Python (what the multi-host tests use; `prefix` is the command that puts a process on a
host, e.g. `nsenter --net=/run/netns/NAME` on the network-namespace test bed):

    head = start_head("10.251.0.1", dir=DIR, prefix=bed.enter("h1"))
    node = join(head, "10.251.0.2", prefix=bed.enter("h2"))
    ...
    stop(node); stop(head)       # SIGTERM, then SIGKILL of that process group only
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vidscale.cluster.ray_cluster import TOKEN_FILE, new_token, private_dir, ray_cli, token_env

DEFAULT_PORT = 6379
FAST_FAILOVER = {
    # Ray marks a silent node dead after period x threshold (defaults: 3 s x 5, plus a 5 s grace);
    # a test cluster that kills hosts on purpose wants to know within a few seconds
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "4",
    # Ray Train's elastic sizing sees nodes through a coordinator that refreshes every 20 s: right
    # after a node dies it may still ask for the old size, and waits this long (default 60 s)
    # for workers that cannot start before it asks again (read by the controller, which runs
    # on the head and inherits its environment)
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "25",
}
"""Head environment for a cluster whose nodes are killed on purpose (tests); users keep Ray's
defaults, which tolerate a busy node and slow worker starts."""


@dataclass
class RayNode:
    """One `ray start --block` process (its own process group) and what clients need."""
    proc: subprocess.Popen
    address: str
    """This node's address (--node-ip-address)."""
    gcs_address: str
    """host:port of the head's GCS: ray.init(address=...), `--address` of vidscale train."""
    token: str
    """The token file every process of the cluster and every client needs (RAY_AUTH_TOKEN_PATH)."""
    dir: Path
    log: Path
    prefix: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client_env(self) -> dict[str, str]:
        """What a driver (or `ray status`) of this cluster needs in its environment."""
        return token_env(self.token)


def _env(bin_dir: str, token: Path, extra: dict | None) -> dict[str, str]:
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), RAY_USAGE_STATS_ENABLED="0",
               **token_env(token), **(extra or {}))
    for k in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(k, None)  # a token string would win over the file; no single-machine mode here
    return env


def _start(argv: list[str], address: str, gcs: str, token: Path, dir: Path, prefix: list[str], env: dict | None,
           num_cpus: int, num_gpus: int) -> RayNode:
    bin_dir = str(Path(sys.executable).parent)
    node_dir = private_dir(dir / f"node-{address}")  # per node: Ray's sockets, logs, session files
    log = node_dir / "ray.log"
    cmd = [*prefix, *ray_cli(), "start", "--block", f"--node-ip-address={address}",
           f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--temp-dir={node_dir / 't'}",
           "--disable-usage-stats", *argv]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(bin_dir, token, env),
                                start_new_session=True)
    return RayNode(proc, address, gcs, str(token), dir, log, list(prefix))


def _tail(log: Path, n: int = 12) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wait_alive(node: RayNode, timeout_s: float) -> None:
    """Until the cluster lists `node` (its address) as alive, asked from the node's own host."""
    bin_dir = str(Path(sys.executable).parent)
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(any(x['Alive'] and x['NodeManagerAddress'] == sys.argv[2] for x in ray.nodes()))")
    deadline = time.monotonic() + timeout_s
    while True:
        if not node.alive():
            raise RuntimeError(f"Ray on {node.address} exited (log {node.log}):\n{_tail(node.log)}")
        r = subprocess.run([*node.prefix, sys.executable, "-c", probe, node.gcs_address, node.address],
                           capture_output=True, text=True, env=_env(bin_dir, Path(node.token), None), timeout=60)
        if r.returncode == 0 and r.stdout.split()[-1:] == ["True"]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray on {node.address} has not joined {node.gcs_address} within {timeout_s:.0f} s "
                               f"(log {node.log}):\n{_tail(node.log)}\n{r.stderr[-1500:]}")
        time.sleep(1)


def start_head(address: str, port: int = DEFAULT_PORT, dir: str | Path = "", num_cpus: int = 2,
               num_gpus: int = 0, prefix: list[str] | None = None, env: dict | None = None,
               dashboard_port: int = 8265, timeout_s: float = 120) -> RayNode:
    """`ray start --head` at `address:port` (token authentication; a token is generated into
    DIR/auth_token unless one exists), waiting until it answers. `env`: extra environment of
    the head (e.g. FAST_FAILOVER)."""
    dir = private_dir(dir or f"/tmp/vidscale-ray-{os.getuid()}-hosts")
    token = dir / TOKEN_FILE
    if not token.is_file():
        new_token(token)
    head = _start(["--head", f"--port={port}", f"--dashboard-host={address}", f"--dashboard-port={dashboard_port}"],
                  address, f"{address}:{port}", token, dir, list(prefix or []), env, num_cpus, num_gpus)
    try:
        _wait_alive(head, timeout_s)
    except BaseException:
        stop(head)
        raise
    return head


def join(head: RayNode | str, address: str, dir: str | Path = "", num_cpus: int = 2, num_gpus: int = 0,
         prefix: list[str] | None = None, env: dict | None = None, wait: bool = True,
         timeout_s: float = 120) -> RayNode:
    """A worker node at `address` joining `head` (a RayNode, or the head's host:port with the
    token in DIR/auth_token); `wait`: return once the cluster lists it alive."""
    if isinstance(head, RayNode):
        gcs, dir = head.gcs_address, Path(dir or head.dir)
    else:
        gcs, dir = head, private_dir(dir or f"/tmp/vidscale-ray-{os.getuid()}-hosts")
    token = Path(dir) / TOKEN_FILE
    if not token.is_file():
        raise ValueError(f"{token}: no token; copy the head's DIR/auth_token there (every node needs the same)")
    node = _start([f"--address={gcs}"], address, gcs, token, Path(dir), list(prefix or []), env, num_cpus, num_gpus)
    if wait:
        try:
            _wait_alive(node, timeout_s)
        except BaseException:
            stop(node)
            raise
    return node


def stop(node: RayNode, timeout_s: float = 30) -> None:
    """Stop one node: SIGTERM to its `ray start --block` (which stops that node's Ray
    processes), then SIGKILL to whatever of its process group is left. Nothing else."""
    if node.alive():
        try:
            os.killpg(node.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            node.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(node.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        node.proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidscale.cluster.ray_hosts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["head", "join"])
    p.add_argument("--address", required=True, help="head: this node's address; join: the head's HOST:PORT")
    p.add_argument("--node-address", default="", help="join: this node's address")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="head: the GCS port")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--num-gpus", type=int, default=0)
    p.add_argument("--dir", default=f"/tmp/vidscale-ray-{os.getuid()}-hosts",
                   help="holds auth_token (shared by every node) and each node's Ray files")
    a = p.parse_args(argv)
    if a.role == "head":
        node = start_head(a.address, a.port, a.dir, a.num_cpus, a.num_gpus)
        print(f"Ray head at {node.gcs_address}; clients: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={node.token}",
              flush=True)
    else:
        if not a.node_address:
            p.error("join needs --node-address (this node's address on the network the others reach)")
        node = join(a.address, a.node_address, a.dir, a.num_cpus, a.num_gpus)
        print(f"joined {a.address} as {node.address}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: stop(node))
    try:
        return node.proc.wait()
    except KeyboardInterrupt:
        stop(node)
        return 0


if __name__ == "__main__":
    sys.exit(main())
