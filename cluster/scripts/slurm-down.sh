#!/usr/bin/env bash
# Stop what cluster/scripts/slurm-up.sh started (listed in $DIR/started), nothing else.
set -uo pipefail
DIR=${VIDSCALE_SLURM_DIR:-/tmp/vidscale-slurm}
[ -f "$DIR/started" ] || { echo "slurm-down: nothing was started by slurm-up.sh" >&2; exit 0; }
# reverse order: slurmd, slurmctld, then munged
tac "$DIR/started" | while read -r what arg; do
  case "$what" in
    link) [ -L "$arg" ] && rm -f "$arg" ;;
    slurmd|slurmctld|munged)
      if kill -0 "$arg" 2>/dev/null && grep -q "$what" "/proc/$arg/comm" 2>/dev/null; then
        kill "$arg"
        for _ in $(seq 50); do kill -0 "$arg" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$arg" 2>/dev/null && kill -9 "$arg"
        echo "slurm-down: stopped $what ($arg)" >&2
      fi ;;
  esac
done
rm -f "$DIR/started"
