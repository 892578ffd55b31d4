# Sourced (not run) by slurm-up.sh and slurm-hosts-up.sh: munge, the authentication between
# Slurm's daemons and its clients. Uses the caller's log() and started() functions.
#
#   start_munge    # starts munged unless one answers (`munge -n | unmunge`); records it started
#
# apt does not start munged here: it runs as user munge with a 1024-byte key (mode 400). One
# munged serves every network-namespace host as well: its socket is a file in /run/munge, not
# a network port.
start_munge() {
  (munge -n 2>/dev/null | unmunge >/dev/null 2>&1) && return 0
  mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  chmod 700 /etc/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do (munge -n | unmunge >/dev/null 2>&1) && break; sleep 0.1; done
  local pid
  pid=$(cat /run/munge/munged.pid 2>/dev/null || pgrep -n -x munged)
  started "munged $pid"
  log "started munged ($pid)"
}
