#!/usr/bin/env bash
# Start a single-node Slurm (Debian's slurm-wlm 22.05 + munge) on this machine, when missing.
#
#   cluster/scripts/slurm-up.sh            # prints SLURM_CONF=... as its last line
#   cluster/scripts/slurm-down.sh          # stops only what this script started
#
# Idempotent: a Slurm that already answers (`sinfo` with the current SLURM_CONF, or ours) is
# reused and nothing is started. Otherwise it installs the packages when missing (apt, ~20 s),
# writes slurm.conf under one writable directory ($VIDSCALE_SLURM_DIR, default
# /tmp/vidscale-slurm), starts munged, slurmctld and slurmd by hand (no systemd here) and
# waits until the node is idle. What it started is listed in $DIR/started for slurm-down.sh.
# Choices behind slurm.conf (tried on Debian 12 with Slurm 22.05, as root):
#  - no cgroups needed: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none;
#  - no accounting database: AccountingStorageType=accounting_storage/none, so `sacct` fails
#    and `vidscale status` reads ended jobs from the jobcomp/filetxt log (JobCompLoc);
#  - apt does not start the daemons: munged as cluster/scripts/munge.sh starts it; the node
#    is localhost(127.0.0.1), so nothing depends on the hostname resolving;
#  - a requeued job may start again only cred_expire+1 s later (default 120 s) and pending
#    jobs are looked at every sched_interval (default 60 s): both are lowered below.
set -euo pipefail

DIR=${VIDSCALE_SLURM_DIR:-/tmp/vidscale-slurm}
CONF=$DIR/slurm.conf
mkdir -p "$DIR"
log() { echo "slurm-up: $*" >&2; }
started() { echo "$1" >>"$DIR/started"; }
# shellcheck source=munge.sh
source "$(dirname "${BASH_SOURCE[0]}")/munge.sh"

node_state() { SLURM_CONF=$1 timeout 10 sinfo -h -o %T 2>/dev/null | head -n1 || true; }

# 1. an existing Slurm that answers: reuse it
if command -v sinfo >/dev/null; then
  for c in ${SLURM_CONF:-} /etc/slurm/slurm.conf "$CONF"; do
    [ -f "$c" ] || continue
    s=$(node_state "$c")
    if [ -n "$s" ] && [[ "$s" != down* && "$s" != drain* ]]; then
      log "Slurm already running ($c, node $s)"
      echo "SLURM_CONF=$c"
      exit 0
    fi
  done
fi

# 2. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  if [ "$(id -u)" != 0 ]; then log "Slurm is not installed and this is not root: cannot apt-get install"; exit 1; fi
  log "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >"$DIR/apt.log" 2>&1 || {
    apt-get update -q >>"$DIR/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >>"$DIR/apt.log" 2>&1
  } || { log "apt-get install failed, see $DIR/apt.log"; tail -n 5 "$DIR/apt.log" >&2; exit 1; }
fi

# 3. munge (authentication between the daemons and the clients)
start_munge

# 4. slurm.conf under $DIR
CPUS=${VIDSCALE_SLURM_CPUS:-$(nproc)}
MEM=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
mkdir -p "$DIR/state" "$DIR/spool"
cat >"$CONF" <<CONF
# Single-node test cluster written by cluster/scripts/slurm-up.sh
ClusterName=vidscale
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs wait cred_expire+1 s before they may start again (default 120 s)
AuthInfo=cred_expire=${VIDSCALE_SLURM_CRED_EXPIRE:-10}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# look at pending jobs every second (default 60 s): a requeued job restarts promptly
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$CONF
# client commands without SLURM_CONF (a user's shell) find it too, unless a real config exists
if [ ! -e /etc/slurm/slurm.conf ] && [ "$(id -u)" = 0 ]; then
  mkdir -p /etc/slurm && ln -s "$CONF" /etc/slurm/slurm.conf && started "link /etc/slurm/slurm.conf"
fi

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! alive "$DIR/slurmctld.pid"; then
  slurmctld -f "$CONF" -i
  for _ in $(seq 100); do alive "$DIR/slurmctld.pid" && break; sleep 0.1; done
  started "slurmctld $(cat "$DIR/slurmctld.pid")"
  log "started slurmctld ($(cat "$DIR/slurmctld.pid"))"
fi
if ! alive "$DIR/slurmd.pid"; then
  slurmd -f "$CONF" -N localhost
  for _ in $(seq 100); do alive "$DIR/slurmd.pid" && break; sleep 0.1; done
  started "slurmd $(cat "$DIR/slurmd.pid")"
  log "started slurmd ($(cat "$DIR/slurmd.pid"))"
fi

# 5. wait until the node takes jobs
for i in $(seq 120); do
  s=$(node_state "$CONF")
  case "$s" in
    idle*|mix*|alloc*) log "node $s"; echo "SLURM_CONF=$CONF"; exit 0 ;;
    down*|drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
log "node never became idle (state '${s:-none}'); see $DIR/slurmctld.log and $DIR/slurmd.log"
exit 1
