#!/usr/bin/env bash
# A test bed of N hosts on this machine, one Linux network namespace each (needs root).
#
#   cluster/scripts/hosts.sh up N      # hosts PREFIX-h1..hN at SUBNET.1..N, prints one line per host
#   cluster/scripts/hosts.sh down      # kills what runs inside, deletes every namespace of PREFIX
#   cluster/scripts/hosts.sh pids H    # the processes running on host H (e.g. vs-h2)
#
#   PREFIX  $VIDSCALE_HOSTS_PREFIX (default vs)       SUBNET  $VIDSCALE_HOSTS_SUBNET (default 10.250.0)
#
# Each host has its own loopback and one interface, eth0, with address SUBNET.i/24; the eth0s are
# veth pairs whose other ends sit on a bridge in a namespace of its own (PREFIX-br). There is no
# default route and no link to the machine's real interfaces, so nothing can leave the test bed.
# The veth pairs are created inside the namespaces (never in the machine's own), so a failed
# `up` leaves nothing behind that `down` does not remove. All hosts share the filesystem, like
# nodes on one NFS export.
#
# Run a process on a host with `nsenter --net=/run/netns/PREFIX-hI CMD` (it keeps the machine's
# /sys and cgroup mounts, which slurmd needs); `ip netns exec` mounts a fresh /sys and is the way
# to read a host's own /sys/class/net counters.
set -euo pipefail

PREFIX=${VIDSCALE_HOSTS_PREFIX:-vs}
SUBNET=${VIDSCALE_HOSTS_SUBNET:-10.250.0}
BR=$PREFIX-br
log() { echo "hosts: $*" >&2; }

[[ "$PREFIX" =~ ^[a-z][a-z0-9]{0,5}$ ]] || { log "VIDSCALE_HOSTS_PREFIX=$PREFIX: expected 1-6 lowercase letters or digits"; exit 2; }
[[ "$SUBNET" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || { log "VIDSCALE_HOSTS_SUBNET=$SUBNET: expected three octets like 10.250.0"; exit 2; }

ours() { ip netns list | awk '{print $1}' | grep -E "^$PREFIX-(h[0-9]+|br)\$" || true; }

down() {
  local ns pids
  for ns in $(ours); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  done
  for ns in $(ours); do
    ip netns del "$ns" 2>/dev/null || log "could not delete $ns"
  done
}

up() {
  local n=$1 i ns
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || { log "N=$n: expected 1..200 hosts"; exit 2; }
  [ "$(id -u)" = 0 ] || { log "network namespaces need root"; exit 1; }
  down  # a bed left over by a killed session
  trap 'down; exit 1' ERR
  ip netns add "$BR"
  ip -n "$BR" link add br0 type bridge
  ip -n "$BR" link set br0 up
  ip -n "$BR" link set lo up
  for i in $(seq 1 "$n"); do
    ns=$PREFIX-h$i
    ip netns add "$ns"
    # one end (eth0) inside the host, the other (hI) on the bridge
    ip -n "$BR" link add "h$i" type veth peer name eth0 netns "$ns"
    ip -n "$BR" link set "h$i" master br0
    ip -n "$BR" link set "h$i" up
    ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    echo "$ns $SUBNET.$i"
  done
  trap - ERR
}

case "${1:-}" in
  up) up "${2:-2}" ;;
  down) down ;;
  pids) ip netns pids "${2:?host}" ;;
  *) echo "usage: $0 up N | down | pids HOST" >&2; exit 2 ;;
esac
