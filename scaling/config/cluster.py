"""The `cluster` section (where the ranks run) and its `slurm` part."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

LAUNCHERS = ("local", "ray", "slurm")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""`cluster.launcher` and the CLI's `--launcher` (cluster/launch.py dispatches on them)."""
INTERFACE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}(,[A-Za-z0-9_.:@-]{1,15})*")
"""Linux interface names (at most 15 characters), comma-separated."""


@dataclass
class SlurmArgs:
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "01:00:00"
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    constraint: str = ""
    extra: list[str] = field(default_factory=list)
    """Extra '#SBATCH' options, e.g. ['--exclusive']."""
    signal_seconds: int = 90
    """Pre-emption signal (USR1) this many seconds before the time limit."""
    ray: bool = False
    """Start a Ray cluster inside the allocation and launch through Ray."""


@dataclass
class ClusterArgs:
    launcher: str = "local"
    """Where the ranks run (`LAUNCHERS`): local processes, Ray Train workers or a Slurm job."""
    nproc: int = 1
    """World size (processes, one per device)."""
    address: str = ""
    """Ray cluster address ('' starts an embedded local cluster)."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    """Ray: worker-group failures to recover from (-1: no limit). A node lost from an elastic
    run is a failure too; a resize because resources came back is not."""
    elastic: bool = False
    """Ray: let Ray Train size the worker group between `min_nproc` and `nproc` to what the
    cluster holds: when a node dies the group restarts smaller from the latest complete
    checkpoint (its data-loader state remapped to the new world), and grows back once the
    resources return (checked every `resize_check_s`). Each change is a metrics.jsonl record
    {step, old_world, new_world, seconds_lost}."""
    min_nproc: int = 1
    """Ray, `elastic`: the smallest world the run may continue at (>= 1, <= nproc). The
    layout (parallel.ulysses x parallel.ring) must divide every size in [min_nproc, nproc]."""
    resize_check_s: float = 60.0
    """Ray, `elastic`: seconds between checks for resources to grow the worker group
    (Ray's elastic_resize_monitor_interval_s). A grow restarts the group from the latest
    checkpoint, so a short interval trades steps redone for capacity regained sooner."""
    placement: str = "PACK"
    """Ray: how workers are placed on nodes (`PLACEMENTS`, Ray's placement strategies): PACK
    fills nodes in turn, SPREAD spreads over nodes, STRICT_* fail rather than bend."""
    network_interface: str = ""
    """The interface ranks on different hosts talk over (`eth0`, `ib0`, or a comma list):
    every rank gets it as GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME. '' lets gloo and nccl
    choose, which is right on one host; across hosts gloo otherwise binds the address the
    machine's hostname resolves to, which may be unreachable from the other nodes."""
    slurm: SlurmArgs = field(default_factory=SlurmArgs)


def network_env(cluster: ClusterArgs) -> dict[str, str]:
    """The environment every rank needs to reach the others over `cluster.network_interface`."""
    iface = cluster.network_interface
    return {"GLOO_SOCKET_IFNAME": iface, "NCCL_SOCKET_IFNAME": iface} if iface else {}
