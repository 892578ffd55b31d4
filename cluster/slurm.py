"""The Slurm launcher: render a readable sbatch script into the run dir, check that the
cluster can ever run it, submit it with `sbatch --parsable`, follow, query and cancel it.

Every rank is one `srun` task running `python -m vidscale.cluster.slurm_task`, which maps
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to the torch.distributed environment and calls
the same `train(cfg)` as every other launcher. Pre-emption and the time limit: Slurm sends
USR1 to the batch shell (`--signal=B:USR1@N`); its trap forwards USR1 to the ranks, which
finish their step, save a checkpoint and leave a requeue marker; the script then requeues
the job (`scontrol requeue`), and the requeued ranks resume from that checkpoint.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vidscale.cluster.job import new_job
from vidscale.scaling.config import check_layout, network_env, save_config

SAFE = re.compile(r"[A-Za-z0-9_.,:@%/+=\-\[\]]+")
"""Characters allowed in a value Slurm takes verbatim on an `#SBATCH` line: no spaces,
quotes, `$`, `;`, backquotes or newlines, so nothing can leave the option it belongs to."""
SAFE_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,:@%/+=\-\[\]&|*!()]+")
"""Feature expressions (`a100&ib`, `[rack1|rack2]`) also take & | * ! ( ): still one option."""
EXTRA = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_.,:@%/+=\-\[\]]+)?")
TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
REQUEUE_MARKER = ".requeue"
"""Left in the run dir by rank 0 when it stopped for pre-emption after saving a checkpoint."""
STOP_FILE = ".stop"
"""Touched by the batch script on USR1: ranks that cannot get signals (Ray workers) poll it."""
SCRIPT = "job.sbatch"
CONFIG = "launch.yaml"


QUEUE_OUTAGE_S = 300.0
"""How long a follower (`follow`, `jobarray.follow_array`) keeps asking a controller that does
not answer before it gives up."""
SQUEUE_TIMEOUT_S = 60.0
"""One squeue call: it retries a lost controller by itself (~18 s, Slurm 22.05) before failing."""
SBATCH_TIMEOUT_S = 120.0
FORGOTTEN = "invalid job id"
"""squeue's answer (lower-cased) for a job the controller no longer holds: it ended."""


class SlurmTimeout(ValueError):
    """A Slurm command did not answer within its timeout (the controller down or overloaded)."""


def forgotten(message: str) -> bool:
    """squeue's error `message` says the controller no longer knows the job (it ended long
    enough ago), rather than that the controller could not be asked."""
    return FORGOTTEN in message.lower()


def call(cmd: list[str], timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess:
    """Run a Slurm command (sbatch, squeue, scontrol, ...); `check`: a failure is a one-line
    ValueError. A command that does not answer within `timeout` raises `SlurmTimeout` (one line)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ValueError(f"{cmd[0]}: not found; is this a Slurm cluster? "
                         "(a single-node test cluster: cluster/scripts/slurm-up.sh)") from None
    except subprocess.TimeoutExpired:
        raise SlurmTimeout(f"{' '.join(cmd[:2])}: no answer in {timeout:g} s (is the Slurm controller down "
                           "or overloaded?)") from None
    if check and r.returncode != 0:
        raise ValueError(f"{' '.join(cmd[:2])} failed: {first_error(r.stderr) or r.stdout.strip()}")
    return r


def slurm_pattern(path) -> str:
    """`path` inside a Slurm filename pattern (`--output`): its own `%` kept literal (`%%`),
    not read as a placeholder (`runs/lr%x` would become `runs/lrJOBNAME`)."""
    return str(path).replace("%", "%%")


def first_error(text: str) -> str:
    """The first line of a Slurm command's stderr that says something: Slurm 22.05 built
    without PMIx starts with noise such as `mpi/pmix_v4: ... can not load PMIx library`."""
    lines = [l.strip() for l in text.splitlines() if l.strip() and "pmix" not in l.lower()]
    return lines[0] if lines else ""


def time_seconds(value: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = TIME.fullmatch(value)
    if not m:
        raise ValueError(f"cluster.slurm.time = {value!r}: expected a Slurm time limit "
                         "(minutes, HH:MM:SS or D-HH:MM:SS)")
    d, a, b, c = (int(x) if x else None for x in m.groups())
    if d is None:
        if b is None:
            return a * 60
        if c is None:
            return a * 60 + b
        return a * 3600 + b * 60 + c
    return d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)


@dataclass
class SlurmPlan:
    """The resources of one job, validated."""
    job_name: str
    run_dir: Path
    nodes: int
    ntasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int
    time: str
    signal_seconds: int
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    extra: list[str] = field(default_factory=list)
    ray: bool = False
    network_env: dict[str, str] = field(default_factory=dict)
    """GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME from `cluster.network_interface`."""

    @property
    def ntasks(self) -> int:
        return self.nodes * self.ntasks_per_node


def plan(cfg) -> SlurmPlan:
    """Validate `cluster.slurm.*` and derive the job's shape (one task per rank)."""
    s, c = cfg.cluster.slurm, cfg.cluster
    run_dir = Path(cfg.train.run_dir).absolute()

    def safe(key: str, value: str, pattern=SAFE) -> str:
        if value and not pattern.fullmatch(value):
            raise ValueError(f"{key} = {value!r}: Slurm takes it verbatim; expected letters, digits and "
                             "_ . , : @ % / + = - [ ] only")
        return value

    if s.nodes < 1:
        raise ValueError(f"cluster.slurm.nodes = {s.nodes}: expected a positive integer")
    if c.nproc % s.nodes:
        raise ValueError(f"cluster.nproc = {c.nproc} ranks do not split evenly over cluster.slurm.nodes = {s.nodes}")
    check_layout(cfg, c.nproc, f"--nproc {c.nproc}")
    if s.cpus_per_task < 1:
        raise ValueError(f"cluster.slurm.cpus_per_task = {s.cpus_per_task}: expected a positive integer")
    if s.gpus_per_node < 0:
        raise ValueError(f"cluster.slurm.gpus_per_node = {s.gpus_per_node}: expected 0 or more")
    limit = time_seconds(s.time)
    if not 0 < s.signal_seconds < limit:
        raise ValueError(f"cluster.slurm.signal_seconds = {s.signal_seconds}: expected 1 .. {limit - 1} "
                         f"(seconds before the time limit {s.time!r})")
    for line in s.extra:
        if not EXTRA.fullmatch(line):
            raise ValueError(f"cluster.slurm.extra: {line!r}: expected one sbatch option like '--exclusive' or "
                             "'--mem=64G' (no spaces, quotes or shell characters)")
    safe("train.run_dir", str(run_dir))
    tpn = c.nproc // s.nodes
    gpn = s.gpus_per_node or int(round(c.gpus_per_worker * tpn))
    # a job name is a label, not an option: map anything unusual to '_' rather than refuse
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"vidscale-{cfg.name}")[:64]
    return SlurmPlan(job_name=name, run_dir=run_dir, nodes=s.nodes, ntasks_per_node=tpn,
                     cpus_per_task=s.cpus_per_task, gpus_per_node=gpn, time=s.time,
                     signal_seconds=s.signal_seconds, partition=safe("cluster.slurm.partition", s.partition),
                     account=safe("cluster.slurm.account", s.account), qos=safe("cluster.slurm.qos", s.qos),
                     constraint=safe("cluster.slurm.constraint", s.constraint, SAFE_CONSTRAINT), extra=list(s.extra), ray=s.ray,
                     network_env=network_env(c))


# -- the script ----------------------------------------------------------------------------
def render(p: SlurmPlan, python: str = sys.executable) -> str:
    """The sbatch script: #SBATCH header, rendezvous, the USR1 trap, srun, requeue."""
    q = shlex.quote
    opt = [f"--job-name={p.job_name}", f"--nodes={p.nodes}", f"--ntasks-per-node={p.ntasks_per_node}",
           f"--cpus-per-task={p.cpus_per_task}"]
    if p.gpus_per_node:
        opt.append(f"--gpus-per-node={p.gpus_per_node}")
    opt.append(f"--time={p.time}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(p, key):
            opt.append(f"--{key}={getattr(p, key)}")
    opt += [f"--output={slurm_pattern(p.run_dir)}/slurm-%j.out",
            "# a requeued job appends to its log instead of truncating it", "--open-mode=append",
            "# pre-emption and the time limit requeue the job", "--requeue",
            f"# USR1 to this script (B:) {p.signal_seconds} s before the time limit: checkpoint, then requeue",
            f"--signal=B:USR1@{p.signal_seconds}"]
    opt += p.extra
    # sbatch reads options up to the first command; comments between them are fine
    head = "\n".join(o if o.startswith("#") else f"#SBATCH {o}" for o in opt)
    if p.ray:
        body = _ray_body(p, python)
    else:
        body = f"""srun --kill-on-bad-exit=1 {q(python)} -m vidscale.cluster.slurm_task &
step=$!"""
    net = "".join(f"export {k}={q(v)}\n" for k, v in p.network_env.items())
    if net:
        net = "# ranks on different nodes talk over cluster.network_interface\n" + net
    return f"""#!/bin/bash
# vidscale run '{p.job_name}': {p.ntasks} ranks = {p.nodes} node(s) x {p.ntasks_per_node} task(s).
# Written by `vidscale train --launcher slurm`; resubmit by hand with: sbatch {q(str(p.run_dir / SCRIPT))}
{head}
set -u

RUN_DIR={q(str(p.run_dir))}
echo "vidscale: job $SLURM_JOB_ID starts $(date -u +%FT%TZ), restart ${{SLURM_RESTART_COUNT:-0}}, nodes $SLURM_JOB_NODELIST"

# rendezvous: rank 0 runs on the first node of the allocation, reached at its NodeAddr (the
# address Slurm itself uses; a NodeName need not resolve), else at its name
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
addr=$(scontrol show -o node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2)
export MASTER_ADDR=${{addr:-$first}}
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}}
{net}export VIDSCALE_CONFIG="$RUN_DIR/{CONFIG}"
export VIDSCALE_STOP_FILE="$RUN_DIR/{STOP_FILE}"
rm -f "$VIDSCALE_STOP_FILE" "$RUN_DIR/{REQUEUE_MARKER}"

# pre-emption or time limit: every rank finishes its step, saves a checkpoint and stops
step=
on_usr1() {{
  echo "vidscale: USR1 at $(date -u +%FT%TZ): checkpoint and requeue"
  touch "$VIDSCALE_STOP_FILE"
  [ -n "$step" ] && kill -USR1 "$step" 2>/dev/null
}}
trap on_usr1 USR1

{body}
# `wait` returns early whenever a trapped signal arrives: wait until the step has ended
while kill -0 "$step" 2>/dev/null; do wait "$step"; done
wait "$step"; status=$?

if [ "$status" -eq 0 ] && [ -e "$RUN_DIR/{REQUEUE_MARKER}" ]; then
  echo "vidscale: checkpoint saved; requeueing job $SLURM_JOB_ID"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    # the run is not finished: never end COMPLETED; `vidscale resume` continues it
    echo "vidscale: the requeue of job $SLURM_JOB_ID was refused; continue with: vidscale resume $RUN_DIR"
    exit 1
  fi
  sleep 60  # the requeue ends this script
fi
echo "vidscale: job $SLURM_JOB_ID ends with status $status"
exit "$status"
"""


def _ray_body(p: SlurmPlan, python: str) -> str:
    """Ray inside the allocation: a head on the first node, one worker per other node (each a
    blocking srun step, not waited on), then the Ray launcher as the driver in this shell."""
    q = shlex.quote
    ray = q(str(Path(python).parent / "ray"))
    cpus = p.ntasks_per_node * p.cpus_per_task
    res = f"--num-cpus={cpus} --num-gpus={p.gpus_per_node}"
    return f"""# Ray on Slurm: head on the first node, workers on the others
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
port=$((30000 + SLURM_JOB_ID % 20000))
export RAY_TMPDIR=/tmp/vidscale-ray-$SLURM_JOB_ID
# the head listens on the node's address at a predictable port: every Ray process of this job
# (head, workers, driver; srun passes the environment on) requires a token only this job knows
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$RUN_DIR/.ray-token-$SLURM_JOB_ID"
# a cluster over the allocation's nodes: not Ray's single-machine mode, which a submitting shell
# that drove a local cluster may pass on (sbatch exports its environment)
unset RAY_AUTH_TOKEN RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
(umask 077 && rm -f "$RAY_AUTH_TOKEN_PATH" && {q(python)} -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH") \
  || {{ echo "vidscale: cannot write the Ray token $RAY_AUTH_TOKEN_PATH"; exit 1; }}
srun --nodes=1 --ntasks=1 --cpus-per-task={cpus} -w "${{nodes[0]}}" \\
  {ray} start --head --block --port=$port {res} --include-dashboard=false --disable-usage-stats \\
  --temp-dir="$RAY_TMPDIR" > "$RUN_DIR/ray-head-$SLURM_JOB_ID.log" 2>&1 &
# the head prints the address workers must join (its node IP, which need not be localhost)
address=
for _ in $(seq 120); do
  address=$(grep -o "ray start --address='[^']*'" "$RUN_DIR/ray-head-$SLURM_JOB_ID.log" | head -n1 | cut -d"'" -f2)
  [ -n "$address" ] && break; sleep 1
done
[ -n "$address" ] || {{ echo "vidscale: the Ray head did not start"; cat "$RUN_DIR/ray-head-$SLURM_JOB_ID.log"; exit 1; }}
for node in "${{nodes[@]:1}}"; do
  srun --nodes=1 --ntasks=1 --cpus-per-task={cpus} -w "$node" \\
    {ray} start --address="$address" --block {res} --disable-usage-stats > "$RUN_DIR/ray-$node.log" 2>&1 &
done
{q(python)} -m vidscale.cluster.ray_launcher "$VIDSCALE_CONFIG" --address "$address" --nodes {p.nodes} &
step=$!"""


# -- feasibility -----------------------------------------------------------------------------
def _gpus(gres: str) -> int:
    """GPUs in an sinfo %G field like 'gpu:a100:4(S:0-1),shard:8' (0 for '(null)')."""
    n = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            n += int(parts[-1])
    return n


def _unfit(p: SlurmPlan, part: str, have) -> str:
    """Why partition `part` (nodes: (cpus, gpus) each) can never run the job; '' if it can."""
    have = list(have)
    if p.nodes > len(have):
        return f"cluster.slurm.nodes = {p.nodes}: partition {part!r} has {len(have)} node(s)"
    max_gpus = max(g for _, g in have)
    if p.gpus_per_node > max_gpus:
        return (f"cluster.slurm.gpus_per_node = {p.gpus_per_node}: the nodes of partition {part!r} have "
                f"at most {max_gpus} GPU(s)")
    max_cpus = max(c for c, _ in have)
    if p.ntasks_per_node * p.cpus_per_task > max_cpus:
        return (f"{p.ntasks_per_node} ranks per node x cluster.slurm.cpus_per_task = {p.cpus_per_task} "
                f"need {p.ntasks_per_node * p.cpus_per_task} CPUs per node; the nodes of partition "
                f"{part!r} have at most {max_cpus}")
    return ""


def check_feasible(p: SlurmPlan, script: Path) -> None:
    """Refuse, with one clear line, a job this cluster can never run (it would pend forever)."""
    r = call(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%G|%a"], check=True)
    nodes: dict[str, dict] = {}  # partition -> {node: (cpus, gpus)}
    default = ""
    for line in r.stdout.splitlines():
        part, node, cpus, gres, avail = line.split("|")
        if part.endswith("*"):
            part = default = part[:-1]
        nodes.setdefault(part, {})[node] = (int(cpus), _gpus(gres))
    # `a,b`: Slurm runs the job in the first of the listed partitions that can take it
    parts = [x for x in p.partition.split(",") if x] if p.partition else ([default] if default else [])
    if not parts:
        raise ValueError("cluster.slurm.partition is empty and this cluster has no default partition")
    unknown = [x for x in parts if x not in nodes]
    if unknown:
        raise ValueError(f"cluster.slurm.partition = {p.partition!r}: no such partition on this cluster: "
                         f"{', '.join(unknown)} (partitions: {', '.join(sorted(nodes)) or 'none'})")
    why = [_unfit(p, part, nodes[part].values()) for part in parts]
    if all(why):
        raise ValueError(why[0] if len(why) == 1 else f"no partition of {p.partition!r} can run the job: "
                         + "; ".join(why))
    # whatever else (account, qos, constraint, memory) the controller itself judges
    r = call(["sbatch", "--test-only", str(script)])
    if r.returncode != 0:
        raise ValueError(f"Slurm refuses the job ({script}): {first_error(r.stderr)}")


# -- submit, query, follow, cancel -------------------------------------------------------------
def write_job(cfg) -> tuple[SlurmPlan, Path]:
    """Write RUN_DIR/launch.yaml (what the ranks load) and RUN_DIR/job.sbatch."""
    p = plan(cfg)
    p.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, p.run_dir / CONFIG)
    script = p.run_dir / SCRIPT
    script.write_text(render(p))
    return p, script


def submit(cfg, wait: bool = False, command: list[str] | None = None) -> int:
    p, script = write_job(cfg)
    check_feasible(p, script)
    try:
        r = call(["sbatch", "--parsable", str(script)], timeout=SBATCH_TIMEOUT_S, check=True)
    except SlurmTimeout as e:
        raise ValueError(f"{e}; the job may have been queued all the same: look for job name "
                         f"{p.job_name!r} with `squeue --me` before submitting again") from None
    job_id = r.stdout.strip().split(";")[0]
    job = new_job("slurm", p.run_dir, command or sys.argv, job_ids=[job_id], state="PENDING")
    job.save()
    print(f"vidscale: submitted Slurm job {job_id}; log {p.run_dir}/slurm-{job_id}.out; "
          f"follow with `vidscale status {p.run_dir}`", flush=True)
    if not wait:
        return 0
    return follow(job)


def _scontrol_job(job_id: str) -> dict:
    r = call(["scontrol", "show", "job", "-o", job_id])
    if r.returncode != 0:
        return {}
    return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)


def down_nodes() -> list[str]:
    """The cluster's nodes that take no jobs because they failed (down, not responding, drained)."""
    r = call(["sinfo", "-h", "-N", "-t", "down,drained,fail,no_respond", "-o", "%N"])
    return sorted({l.strip() for l in r.stdout.splitlines() if l.strip()}) if r.returncode == 0 else []


def job_state(job_id: str) -> dict:
    """{'state', 'reason', 'restarts', 'exit_code', 'source', 'nodes', 'down_nodes'}: squeue while
    Slurm remembers the job, then sacct, then the jobcomp log (clusters without accounting).
    `restarts` counts requeues (pre-emption, or a node that failed under the job); while Slurm
    remembers the job, `down_nodes` names the cluster's failed nodes (what it failed on or waits for)."""
    unreachable = ""  # why squeue could not say, when the controller did not answer
    try:
        r = call(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r"], timeout=SQUEUE_TIMEOUT_S)
        if r.returncode != 0:
            msg = first_error(r.stderr) or r.stdout.strip() or f"exit status {r.returncode}"
            unreachable = "" if forgotten(msg) else f"squeue: {msg}"
    except SlurmTimeout as e:
        r, unreachable = None, str(e)
    if r is not None and r.returncode == 0 and r.stdout.strip():
        state, reason = r.stdout.strip().splitlines()[0].split("|", 1)
        info = _scontrol_job(job_id)
        nodes = info.get("NodeList", "")
        return {"state": state, "reason": reason, "restarts": int(info.get("Restarts", 0) or 0),
                "exit_code": info.get("ExitCode", ""), "source": "squeue",
                "nodes": "" if nodes == "(null)" else nodes,
                "down_nodes": down_nodes()}
    none = {"restarts": 0, "nodes": "", "down_nodes": []}
    try:
        r = call(["sacct", "-j", job_id, "-X", "-n", "--parsable2", "-o", "JobID,State,ExitCode,Reason"])
    except SlurmTimeout:
        r = None
    if r is not None and r.returncode == 0 and r.stdout.strip():
        _, state, code, reason = r.stdout.strip().splitlines()[-1].split("|")
        return {**none, "state": state.split()[0], "reason": reason, "exit_code": code, "source": "sacct"}
    line = "" if unreachable else _jobcomp_line(job_id)
    if line:
        kv = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        return {**none, "state": kv.get("JobState", "UNKNOWN"), "reason": "", "exit_code": kv.get("ExitCode", ""),
                "source": "jobcomp", "nodes": kv.get("NodeList", "")}
    if unreachable:  # not a job that ended: nobody could ask
        return {**none, "state": "UNKNOWN", "reason": unreachable, "exit_code": "", "source": "unreachable"}
    return {**none, "state": "UNKNOWN", "reason": "Slurm has no record of the job", "exit_code": "", "source": ""}


def _jobcomp_line(job_id: str) -> str:
    r = call(["scontrol", "show", "config"])
    m = re.search(r"^JobCompLoc\s*=\s*(\S+)", r.stdout, re.M)
    if not m or not Path(m.group(1)).is_file():
        return ""
    last = ""
    for line in Path(m.group(1)).read_text(errors="replace").splitlines():
        if line.startswith(f"JobId={job_id} "):
            last = line  # a requeued job has one line per run: the last one counts
    return last


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "UNKNOWN"}


def ended(st: dict) -> bool:
    """Whether the job `job_state` describes is over for good. Not while the controller could
    not be asked (source 'unreachable'), nor PREEMPTED while squeue still lists the job (a
    requeue follows); UNKNOWN otherwise means Slurm has no record of it left (it ended long ago)."""
    if st["source"] == "unreachable":
        return False
    if st["state"] == "PREEMPTED" and st["source"] == "squeue":
        return False
    return st["state"] in TERMINAL


def follow(job, poll_s: float = 1.0, out=sys.stdout) -> int:
    """Print the job's log as it grows until the job ends; 0 if it COMPLETED. A requeued job is
    nudged to start now instead of waiting out Slurm's requeue delay (BeginTime)."""
    job_id = job.job_ids[-1]
    log = Path(job.run_dir) / f"slurm-{job_id}.out"
    pos, nudged, down_since = 0, -1, None
    while True:
        st = job_state(job_id)
        if st["source"] == "unreachable":  # the controller is away: the job may well go on
            now = time.monotonic()
            if down_since is None:
                down_since = now
                print(f"vidscale: Slurm does not answer ({st['reason']}); job {job_id}: asking again for up to "
                      f"{QUEUE_OUTAGE_S:g} s", file=sys.stderr, flush=True)
            if now - down_since >= QUEUE_OUTAGE_S:
                print(f"vidscale: Slurm has not answered for {now - down_since:.0f} s; job {job_id} may still run: "
                      f"`vidscale status {job.run_dir}` once it answers", file=sys.stderr, flush=True)
                return 1
            time.sleep(min(30.0, max(poll_s, 2.0)))
            continue
        down_since = None
        if log.is_file():
            with open(log, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                out.write(chunk)
                out.flush()
        if st["state"] == "PENDING" and st["restarts"] > nudged and st["reason"] == "BeginTime":
            call(["scontrol", "update", f"jobid={job_id}", "StartTime=now"])
            nudged = st["restarts"]
        if st["state"] != job.state:
            job.set_state(st["state"])
        if ended(st):
            return 0 if st["state"] == "COMPLETED" else 1
        time.sleep(poll_s)


def cancel(job) -> None:
    for job_id in job.job_ids:
        call(["scancel", job_id], check=True)
    job.set_state("CANCELLED")
