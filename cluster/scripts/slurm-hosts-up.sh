#!/usr/bin/env bash
# A multi-node Slurm over the hosts of the network-namespace test bed (cluster/scripts/hosts.sh).
#
#   cluster/scripts/hosts.sh up 2              # the hosts PREFIX-h1, PREFIX-h2 at SUBNET.1, SUBNET.2
#   cluster/scripts/slurm-hosts-up.sh 2        # prints SLURM_CONF=... as its last line
#   nsenter --net=/run/netns/PREFIX-h1 env SLURM_CONF=... sbatch ...   # clients run on a host
#   cluster/scripts/slurm-hosts-down.sh        # stops only what slurm-hosts-up.sh started
#
#   PREFIX  $VIDSCALE_HOSTS_PREFIX (default vs)    SUBNET  $VIDSCALE_HOSTS_SUBNET (default 10.250.0)
#   DIR     $VIDSCALE_SLURM_HOSTS_DIR (default /tmp/vidscale-slurm-PREFIX): slurm.conf, state, logs
#
# The nodes are h1..hN (NodeName=hI NodeAddr=SUBNET.I); slurmctld runs on h1, one slurmd per
# host. Every daemon is started with `nsenter --net=/run/netns/PREFIX-hI` (not `ip netns exec`,
# which mounts a fresh /sys without the cgroup hierarchy: slurmd then dies). All hosts share one
# hostname and one filesystem, so the controller is named `SlurmctldHost=$(hostname)(SUBNET.1)`
# and each slurmd gets its node name with `-N hI` and its own spool, pid and log file (`%n`).
# One munged serves every host through the filesystem (/run/munge): the one
# cluster/scripts/slurm-up.sh starts is reused when it answers, else it is started the same way
# (cluster/scripts/munge.sh, which both scripts source).
#
# Idempotent: run it again and it starts only what is missing (a slurmd killed with its host is
# restarted this way) and waits until every node takes jobs again (ReturnToService=2).
# Node failure is detected fast for tests: slurmctld pings the slurmds every SlurmdTimeout/3 s and
# sets a node DOWN after SlurmdTimeout=${VIDSCALE_SLURMD_TIMEOUT:-10} s without an answer.
#
# On real nodes the same slurm.conf applies with the nodes' own names and addresses:
#   SlurmctldHost=HEAD(HEAD_ADDR)  and one  NodeName=NODE NodeAddr=ADDR CPUs=.. RealMemory=..  line per
#   node; copy /etc/munge/munge.key (mode 400, owner munge) to every node and run munged there;
#   put slurm.conf where every node reads it (shared filesystem or /etc/slurm); start
#   `slurmctld -f CONF` on HEAD and `slurmd -f CONF` on each node (no -N needed when each node's
#   hostname is its NodeName; no nsenter); keep SlurmdTimeout at its default (300 s) or what the
#   site uses. NodeAddr need not be what the NodeName resolves to: the sbatch script of
#   `vidscale train --launcher slurm` reads the first node's NodeAddr for MASTER_ADDR.
set -euo pipefail

N=${1:-2}
PREFIX=${VIDSCALE_HOSTS_PREFIX:-vs}
SUBNET=${VIDSCALE_HOSTS_SUBNET:-10.250.0}
DIR=${VIDSCALE_SLURM_HOSTS_DIR:-/tmp/vidscale-slurm-$PREFIX}
CONF=$DIR/slurm.conf
log() { echo "slurm-hosts-up: $*" >&2; }
started() { echo "$1" >>"$DIR/started"; }
# shellcheck source=munge.sh
source "$(dirname "${BASH_SOURCE[0]}")/munge.sh"

[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 1 ] && [ "$N" -le 200 ] || { log "N=$N: expected 1..200 hosts"; exit 2; }
[[ "$PREFIX" =~ ^[a-z][a-z0-9]{0,5}$ ]] || { log "VIDSCALE_HOSTS_PREFIX=$PREFIX: expected 1-6 lowercase letters or digits"; exit 2; }
[ "$DIR" != /tmp/vidscale-slurm ] || { log "$DIR is the single-node Slurm's directory (cluster/scripts/slurm-up.sh)"; exit 2; }
for i in $(seq 1 "$N"); do
  [ -e "/run/netns/$PREFIX-h$i" ] || { log "no host $PREFIX-h$i: run cluster/scripts/hosts.sh up $N first (same VIDSCALE_HOSTS_PREFIX)"; exit 1; }
done
for c in slurmctld slurmd munged sbatch nsenter; do
  command -v $c >/dev/null || { log "$c not found: install slurmctld slurmd slurm-client munge (or run cluster/scripts/slurm-up.sh once)"; exit 1; }
done
mkdir -p "$DIR/state" "$DIR/spool"
on() { local h=$1; shift; nsenter --net="/run/netns/$PREFIX-$h" "$@"; }

# 1. munge, shared by every host through /run/munge (its socket is a file, not a network port)
start_munge

# 2. slurm.conf
CPUS=${VIDSCALE_SLURM_CPUS:-$(nproc)}
# every node is this machine: each may claim all of its memory, divided among the nodes
MEM=$(awk -v n="$N" '/MemTotal/ {printf "%d", $2 / 1024 * 0.9 / n}' /proc/meminfo)
TIMEOUT=${VIDSCALE_SLURMD_TIMEOUT:-10}
{
  cat <<CONF
# Multi-node test cluster over network-namespace hosts, written by cluster/scripts/slurm-hosts-up.sh
ClusterName=vidscale-$PREFIX
SlurmctldHost=$(hostname)($SUBNET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs wait cred_expire+1 s before they may start again (default 120 s)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
# a node that was DOWN (not responding) takes jobs again as soon as its slurmd registers
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
# node failure, detected in seconds rather than minutes: the controller pings every
# SlurmdTimeout/3 s and sets a node DOWN after SlurmdTimeout s of silence
SlurmdTimeout=$TIMEOUT
MessageTimeout=5
SlurmdDebug=${VIDSCALE_SLURM_DEBUG:-info}
SlurmctldDebug=${VIDSCALE_SLURM_DEBUG:-info}
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
CONF
  for i in $(seq 1 "$N"); do
    echo "NodeName=h$i NodeAddr=$SUBNET.$i CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
  done
  # LLN: each job goes to the least loaded node, so small jobs (a sweep's array tasks) spread
  # over the nodes instead of filling h1 first
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP LLN=YES"
} >"$CONF.tmp"
mv "$CONF.tmp" "$CONF"
export SLURM_CONF=$CONF

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_pid() { for _ in $(seq 100); do alive "$1" && return 0; sleep 0.1; done; return 1; }
if ! alive "$DIR/slurmctld.pid"; then
  on h1 slurmctld -f "$CONF" -i
  wait_pid "$DIR/slurmctld.pid" || { log "slurmctld did not start; see $DIR/slurmctld.log"; exit 1; }
  started "slurmctld $(cat "$DIR/slurmctld.pid")"
  log "started slurmctld on h1 ($(cat "$DIR/slurmctld.pid"))"
else
  on h1 scontrol reconfigure >/dev/null 2>&1 || true
fi
for i in $(seq 1 "$N"); do
  pidf=$DIR/slurmd-h$i.pid
  alive "$pidf" && continue
  mkdir -p "$DIR/spool/h$i"
  on "h$i" slurmd -f "$CONF" -N "h$i"
  wait_pid "$pidf" || { log "slurmd h$i did not start; see $DIR/slurmd-h$i.log"; exit 1; }
  started "slurmd $(cat "$pidf")"
  log "started slurmd on h$i ($(cat "$pidf"))"
done

# 3. wait until every node takes jobs
for _ in $(seq 120); do
  states=$(on h1 timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null || true)
  ready=$(echo "$states" | grep -cE ' (idle|mixed|allocated|completing)$' || true)
  if [ "$ready" -eq "$N" ]; then log "nodes: $(echo $states)"; echo "SLURM_CONF=$CONF"; exit 0; fi
  sleep 0.5
done
log "nodes never all became idle ($(echo ${states:-none})); see $DIR/slurmctld.log and $DIR/slurmd-h*.log"
exit 1
