"""Start and stop a local Ray cluster (head node) that outlives one command: the target of
detached Ray jobs on this machine, and the cluster the tests share.

    python -m vidscale.cluster.ray_cluster up [--num-cpus N] [--dir DIR]   # prints RAY_ADDRESS=http://...
    python -m vidscale.cluster.ray_cluster down [--dir DIR]                # stops only that cluster

The head runs as `ray start --head --block` in its own process group, every Ray process
listening on 127.0.0.1 only (node address, GCS, raylet, agents, dashboard / job server) and
requiring a token (`RAY_AUTH_MODE=token`) that `up` generates into DIR/auth_token (mode
0600) and prints as `RAY_AUTH_TOKEN_PATH=...`; `down` sends that process SIGTERM, which
stops every process of this cluster, kills what of them is left after 8 s (once a job has
run, Ray's drain takes ~30 s), and touches nothing else (`ray stop` would stop every Ray
cluster on the machine). Jobs run the Python that `ray start` saw: this venv's.
DIR (default /tmp/vidscale-ray-UID) is private: created 0700, refused when it is a symlink
or belongs to another user.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vidscale.cluster.proctree import Proc, alive, children, proc, stop_tree, tree
from vidscale.scaling.train.signals import STOP_SIGNALS, Interrupted, stop_on

DEFAULT_DIR = f"/tmp/vidscale-ray-{os.getuid()}"  # short: Ray's socket paths live under it (108-byte limit)
TOKEN_FILE = "auth_token"
LOCAL_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray resolves a node address of 127.0.0.1 to the machine's network address and its gRPC
servers then listen on every interface; in its single-machine mode (the default on macOS,
this switch elsewhere) the node address stays 127.0.0.1 and every server listens there only."""


@dataclass
class RayHead:
    pid: int
    gcs_address: str
    """host:port for ray.init(address=...)."""
    dashboard: str
    """http://host:port of the dashboard and job server (JobSubmissionClient)."""
    dir: str
    token: str = ""
    """The token file every client of this head needs (RAY_AUTH_TOKEN_PATH)."""
    start: int = 0
    """The head process's start time (proctree.Proc): with the pid, its identity. A record
    whose pid now belongs to another process (the head was killed, the pid reused) is stale."""

    def alive(self) -> bool:
        if self.start:
            return alive(Proc(self.pid, self.start))
        # a record without a start time (older vidscale): only a `ray start` process is the head
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            return False
        return b"start" in cmd and b"--head" in cmd


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


def private_dir(dir: str | Path, create: bool = True) -> Path:
    """`dir` as a directory only this user can enter: created 0700; a symlink or a directory
    of another user is refused (someone could have planted it in the shared /tmp)."""
    p = Path(dir)
    if create:
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            pass
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"Ray directory {p}: is a symlink or not a directory; expected a private directory "
                         f"of this user (remove it or pass another --dir)")
    if st.st_uid != os.getuid():
        raise ValueError(f"Ray directory {p}: belongs to uid {st.st_uid}, not to this user ({os.getuid()}); "
                         f"remove it or pass another --dir")
    if st.st_mode & 0o077:
        os.chmod(p, 0o700)
    return p


def new_token(path: str | Path) -> Path:
    """A fresh random token (256 bits, like `ray get-auth-token --generate`) in `path`, mode
    0600, replacing any earlier one atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.replace(tmp, path)
    return path


def token_env(path: str | Path) -> dict[str, str]:
    """The environment that makes a Ray process (server or client) require / send the token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def ray_cli() -> list[str]:
    """This Python's Ray CLI. Not the first `ray` on PATH: a node starts its workers with the
    Python that ran `ray start`, and they must import this installation of vidscale (a venv
    that links another's packages has no `ray` script of its own)."""
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _state_file(dir: str | Path) -> Path:
    return Path(dir) / "head.json"


def read_head(dir: str | Path = DEFAULT_DIR) -> RayHead | None:
    private_dir(dir, create=False)
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


LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def split_address(address: str) -> tuple[str, int | None]:
    """(host, port) of a Ray address: a GCS `host:port`, `ray://host:port` or a dashboard URL
    (`[v6]` hosts unbracketed); port None when there is none (`auto`, a bare host, nonsense)."""
    m = re.match(r"^(?:\w+://)?(\[[^\]]+\]|[^:/\[\]]*)(?::(\d+))?(?:/.*)?$", address)
    if not m:
        return address, None
    return m.group(1).strip("[]"), int(m.group(2)) if m.group(2) else None


def use_token_auth(address: str = "") -> None:
    """Make this process's Ray client send a token, unless the user chose a mode: the token of
    the head recorded in DEFAULT_DIR when `address` is that head's; else Ray's default
    ~/.ray/auth_token (Ray 2.5x+ writes it for new local clusters, but its job client only
    sends it when RAY_AUTH_MODE=token). A client of a cluster on 127.0.0.1 also takes
    LOCAL_ONLY, or it would wait for a node at the machine's network address."""
    if split_address(address)[0] in LOOPBACK_HOSTS:
        os.environ.update(LOCAL_ONLY)  # a driver of a cluster on 127.0.0.1 must itself be a node there
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        head = read_head(DEFAULT_DIR)
    except (ValueError, OSError, TypeError):
        head = None
    if head is not None and head.token and address in (head.gcs_address, head.dashboard):
        os.environ.update(token_env(head.token))
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def start_head(num_cpus: int = 4, num_gpus: int = 0, dir: str | Path = DEFAULT_DIR,
               timeout_s: float = 90) -> RayHead:
    """A running head recorded in DIR is reused; otherwise start one and wait for its job server.
    Its clients need `token_env(head.token)`."""
    dir = private_dir(dir)
    head = read_head(dir)
    if head is not None and head.token and _dashboard_up(head.dashboard):
        return head
    if head is not None:  # one started without a token (or not answering): replace it
        stop_head(head)
    token = new_token(dir / TOKEN_FILE)
    port, dash = _free_port(), _free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), RAY_USAGE_STATS_ENABLED="0",
               **token_env(token), **LOCAL_ONLY)
    env.pop("RAY_AUTH_TOKEN", None)  # would win over the file
    env.pop("RAY_ADDRESS", None)
    log = open(dir / "head.log", "w")
    popen = subprocess.Popen(
        [*ray_cli(), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--temp-dir={dir / 'tmp'}",
         "--disable-usage-stats", *_side_ports()],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    me = proc(popen.pid)
    head = RayHead(pid=popen.pid, gcs_address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dash}",
                   dir=str(dir), token=str(token), start=me.start if me else 0)
    _state_file(dir).write_text(json.dumps(asdict(head)))
    deadline = time.monotonic() + timeout_s
    while not _dashboard_up(head.dashboard):
        if popen.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            tail = "\n".join((dir / "head.log").read_text(errors="replace").splitlines()[-10:])
            raise RuntimeError(f"the Ray head did not start (log {dir / 'head.log'}):\n{tail}")
        time.sleep(0.5)
    return head


def stop_head(head: RayHead | None = None, dir: str | Path = DEFAULT_DIR, timeout_s: float = 8) -> bool:
    """Stop the head started by `start_head`: SIGTERM to `ray start --block`, which stops its
    processes; what is left of them after timeout_s is killed (after a job has run, some of
    Ray's agents ignore SIGTERM and the drain takes ~30 s; a head keeps no state worth waiting
    for). True if one was running."""
    head = head or read_head(dir)
    if head is None:
        return False
    if not head.alive():  # already gone, its pid maybe another process's now: signal nothing
        _state_file(head.dir).unlink(missing_ok=True)
        return False
    root = proc(head.pid)
    procs = tree([root]) if root else []  # recorded before the signal: orphans stay identifiable
    try:
        os.kill(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.waitpid(head.pid, os.WNOHANG)  # reap it when it is our child
        except ChildProcessError:
            pass
        if not head.alive() or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    stop_tree(procs, grace_s=0)  # anything of this cluster that outlived the head
    try:  # and whatever joined its process group since
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
        for k, v in token_env(head.token).items():
            print(f"{k}={v}")
        print(f"# ray.init(address='{head.gcs_address}'); stop with: python -m vidscale.cluster.ray_cluster down --dir {a.dir}",
              file=sys.stderr)
        return 0
    print("stopped" if stop_head(dir=a.dir) else "no Ray head recorded in " + a.dir)
    return 0


_process_token: list[Path] = []


def init_keeping_handlers(**kwargs) -> None:
    """`ray.init(**kwargs)` without its signal handler: ray.init installs one for SIGTERM that
    ends the process at once (no `finally`, no shutdown; measured with Ray 2.60), which would
    leave an embedded cluster's processes behind. The handlers in place before are put back."""
    import ray
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    ray.init(**kwargs)
    for s, h in saved.items():
        if h is not None and signal.getsignal(s) is not h:
            signal.signal(s, h)


class EmbeddedRay:
    """A local Ray head started here and stopped here, every process of it listening on
    127.0.0.1 only and requiring a token generated for this process (DEFAULT_DIR/token-PID,
    0600); runs connect by address and inherit the token through the environment, which is
    restored on exit.

    Stopping it stops every process it started, and only those: the node processes ray.init
    started (this process's new children) and whatever they started (agents, workers), each
    known by pid and start time. Ray's own shutdown leaves its dashboard and runtime-env
    agents running (they ignore SIGTERM); those left after a short grace get SIGKILL. While
    it runs, SIGTERM / SIGHUP / SIGINT raise `Interrupted` (unless the caller handles or
    ignores them), so the cluster is stopped on the way out and the process exits 128+signal.
    One token per process: Ray's C++ side caches the first it reads."""

    def __init__(self, cpus: int, gpus: int = 0, runtime_env: dict | None = None):
        self.cpus, self.gpus, self.runtime_env = cpus, gpus, runtime_env
        self._saved: dict[str, str | None] = {}
        self._handlers: dict[int, object] = {}
        self.processes: list[Proc] = []
        """The node processes ray.init started here (gcs, raylet, dashboard, monitors)."""

    def __enter__(self) -> str:
        if not _process_token:
            _process_token.append(new_token(private_dir(DEFAULT_DIR) / f"token-{os.getpid()}"))
            atexit.register(_process_token[0].unlink, missing_ok=True)
        env = {**token_env(_process_token[0]), **LOCAL_ONLY}
        self._saved = {k: os.environ.get(k) for k in (*env, "RAY_AUTH_TOKEN")}
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ.update(env)
        import ray
        from ray._private import ray_constants
        from ray._raylet import Config
        ray_constants.ENABLE_RAY_CLUSTER = False  # LOCAL_ONLY, read once when ray was imported
        Config.initialize("")  # RAY_AUTH_MODE too (what ray's own _enable_token_auth does)
        # a signal the caller left at its default would end this process and orphan the cluster
        default = [s for s in STOP_SIGNALS if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler)]
        self._handlers = stop_on(*default)
        before = children(os.getpid())
        try:
            init_keeping_handlers(num_cpus=self.cpus, num_gpus=self.gpus, include_dashboard=False,
                                  _node_ip_address="127.0.0.1", runtime_env=self.runtime_env,
                                  logging_level="WARNING")
        except BaseException:  # failed or interrupted half way: stop what it started
            self.processes = [p for p in map(proc, children(os.getpid()) - before) if p]
            self.__exit__(None, None, None)
            raise
        self.processes = [p for p in map(proc, children(os.getpid()) - before) if p]
        return ray.get_runtime_context().gcs_address

    def __exit__(self, *exc) -> None:
        import ray
        # a second signal must not cut the clean-up short: noted, and raised once it is done
        # (unless an exception is already on its way out)
        later: list[int] = []
        main = threading.current_thread() is threading.main_thread()
        held = {s: signal.signal(s, lambda signum, frame: later.append(signum)) for s in STOP_SIGNALS
                if main and signal.getsignal(s) not in (None, signal.SIG_IGN)}
        try:
            cluster = tree(self.processes)  # before the shutdown: the agents then lose their parent
            ray.shutdown()
            left = stop_tree(cluster)
            if left:
                print(f"vidscale: could not stop Ray processes {[p.pid for p in left]}", file=sys.stderr)
        finally:
            for k, v in self._saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            for s, h in (*held.items(), *self._handlers.items()):
                signal.signal(s, h)
            self._handlers = {}
        if later and exc[0] is None:
            raise Interrupted(later[0])


if __name__ == "__main__":
    sys.exit(main())

