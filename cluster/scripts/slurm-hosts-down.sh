#!/usr/bin/env bash
# Stop what cluster/scripts/slurm-hosts-up.sh started (listed in $DIR/started), nothing else.
# munged is left running while another Slurm daemon on this machine (e.g. the single-node
# cluster of slurm-up.sh, which may have reused ours) still needs it.
set -uo pipefail
PREFIX=${VIDSCALE_HOSTS_PREFIX:-vs}
DIR=${VIDSCALE_SLURM_HOSTS_DIR:-/tmp/vidscale-slurm-$PREFIX}
[ -f "$DIR/started" ] || { echo "slurm-hosts-down: nothing was started by slurm-hosts-up.sh" >&2; exit 0; }
stop() {  # pid name
  if kill -0 "$1" 2>/dev/null && grep -q "$2" "/proc/$1/comm" 2>/dev/null; then
    kill "$1"
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$1" 2>/dev/null && kill -9 "$1"
    echo "slurm-hosts-down: stopped $2 ($1)" >&2
  fi
  return 0
}
ours=$(awk '$1 == "slurmd" || $1 == "slurmctld" {print $2}' "$DIR/started")
# slurmds first, then slurmctld, then munged
for what in slurmd slurmctld; do
  awk -v w="$what" '$1 == w {print $2}' "$DIR/started" | while read -r pid; do stop "$pid" "$what"; done
done
awk '$1 == "munged" {print $2}' "$DIR/started" | while read -r pid; do
  others=$(for d in slurmd slurmctld slurmstepd; do pgrep -x $d; done | grep -vxF -f <(echo "$ours") || true)
  if [ -n "$others" ]; then
    echo "slurm-hosts-down: leaving munged ($pid) running: other Slurm daemons use it ($(echo $others))" >&2
  else
    stop "$pid" munged
  fi
done
rm -f "$DIR/started"
