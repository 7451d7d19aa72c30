#!/usr/bin/env bash
# Install and run a real single-node Slurm on this (Debian) machine, without systemd: the tests'
# own infrastructure (tests/clusters.py runs it), for a CI machine or a throwaway one. It never
# touches a Slurm it did not set up: a slurm.conf without its ClusterName=windtunnel is refused.
#
#   slurm.sh up [CPUS]   install slurmctld/slurmd/slurm-client/munge with apt-get when missing,
#                        write /etc/slurm/slurm.conf from slurm.conf.template and the Epilog
#                        from slurm-epilog.sh, start munged, slurmctld and slurmd, wait until
#                        the node is idle. Idempotent; on running daemons whose slurm.conf it
#                        rewrote (an older template), it restarts them.
#                        CPUS (optional) advertises more CPUs than the machine has, so more
#                        jobs run side by side (SlurmdParameters=config_overrides).
#   slurm.sh down        stop slurmd, slurmctld and munged (the ones this script started).
#   slurm.sh status      print the daemons' state and `sinfo`; exit 0 only when the node is up.
#
# Needs root. Logs: /var/log/slurm/{slurmctld,slurmd}.log, /var/log/munge/munged.log.
# Environment: WINDTUNNEL_SLURM_TIMEOUT (seconds to wait for the node, default 60).
# WINDTUNNEL_SLURM_CONF: the config checked and written (default /etc/slurm/slurm.conf; the
# daemons read that one, so another path serves only the refusal's test).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF=${WINDTUNNEL_SLURM_CONF:-/etc/slurm/slurm.conf}
MARK=ClusterName=windtunnel  # the template's line: a config without it is the site's
LOGDIR=/var/log/slurm
RUNDIR=/run/slurm
EPILOG=/etc/slurm/windtunnel-epilog.sh
# Markers that hold a job COMPLETING in the Epilog (slurm-epilog.sh); root's only.
HOLD_DIR=$RUNDIR/epilog-hold
TIMEOUT=${WINDTUNNEL_SLURM_TIMEOUT:-60}
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "slurm.sh: $*"; }
die() { echo "slurm.sh: error: $*" >&2; exit 1; }

# A site's Slurm (a slurm.conf this script did not write) is left alone: neither its config
# rewritten nor its daemons stopped. Checked first, before root is needed.
own_config() {
  [ ! -e "$CONF" ] || grep -qx "$MARK" "$CONF" \
    || die "$CONF exists and was not written by this script (no $MARK); leaving this machine's Slurm alone"
}

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (installs packages, writes /etc/slurm, starts daemons); try: sudo $0 $*"
}

# pid of a daemon from its pid file, empty when it is not running.
running_pid() {
  local pidfile=$1 name=$2 pid
  [ -r "$pidfile" ] || return 0
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && grep -qx "$name" "/proc/$pid/comm" && alive "$pid"; then
    echo "$pid"
  fi
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} (Debian/Ubuntu packages) by hand"
  say "installing ${missing[*]} with apt-get (log: /tmp/windtunnel-slurm-apt.log)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >/tmp/windtunnel-slurm-apt.log 2>&1 \
    || die "apt-get install ${missing[*]} failed; see /tmp/windtunnel-slurm-apt.log"
}

write_config() {
  local extra_cpus=${1:-} hw host
  host=$(hostname -s)
  # `slurmd -C` prints this node's line: NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105
  hw=$(slurmd -C | head -1)
  field() { echo "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  local cpus boards sockets cores threads memory extra=""
  cpus=$(field CPUs); boards=$(field Boards); sockets=$(field SocketsPerBoard)
  cores=$(field CoresPerSocket); threads=$(field ThreadsPerCore); memory=$(field RealMemory)
  # Leave 5% of the memory to the OS so slurmd never reports less than configured.
  memory=$((memory * 95 / 100))
  if [ -n "$extra_cpus" ] && [ "$extra_cpus" != "$cpus" ]; then
    [[ "$extra_cpus" =~ ^[1-9][0-9]*$ ]] || die "CPUS must be a positive integer (got $extra_cpus)"
    cpus=$extra_cpus; boards=1; sockets=1; cores=$extra_cpus; threads=1
    extra="# CPUs above the hardware's count (slurm.sh up $extra_cpus).
SlurmdParameters=config_overrides"
  fi
  mkdir -p /etc/slurm
  local tmp
  tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
  awk -v host="$host" -v cpus="$cpus" -v boards="$boards" -v sockets="$sockets" \
      -v cores="$cores" -v threads="$threads" -v memory="$memory" -v extra="$extra" '
    { gsub(/@HOST@/, host); gsub(/@CPUS@/, cpus); gsub(/@BOARDS@/, boards);
      gsub(/@SOCKETS@/, sockets); gsub(/@CORES@/, cores); gsub(/@THREADS@/, threads);
      gsub(/@MEMORY@/, memory); gsub(/@EXTRA@/, extra); print }' \
    "$HERE/slurm.conf.template" >"$tmp"
  chmod 644 "$tmp"
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return 1   # unchanged
  fi
  mv "$tmp" "$CONF"
  say "wrote $CONF (node $host, $cpus CPUs, ${memory} MB)"
  return 0
}

# The Epilog slurm.conf names, copied out of the checkout (which may move or go) and replaced
# whole by a rename, so slurmd never runs a half-written one (a failing Epilog drains the node).
install_epilog() {
  local tmp
  mkdir -p /etc/slurm
  cmp -s "$HERE/slurm-epilog.sh" "$EPILOG" && return 0
  tmp=$(mktemp /etc/slurm/.windtunnel-epilog.XXXXXX)
  cp "$HERE/slurm-epilog.sh" "$tmp"
  chmod 755 "$tmp"
  mv "$tmp" "$EPILOG"
}

start_munge() {
  if [ -n "$(running_pid /run/munge/munged.pid munged)" ]; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
    || die "munged did not start; see /var/log/munge/munged.log"
  munge -n | unmunge >/dev/null 2>&1 || die "munge does not answer; see /var/log/munge/munged.log"
}

node_state() {
  sinfo -h -N -o '%T' 2>/dev/null | head -1
}

up() {
  own_config
  need_root up
  install_packages
  local changed=0
  install_epilog
  write_config "${1:-}" && changed=1
  mkdir -p "$RUNDIR" "$LOGDIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$HOLD_DIR"
  chown slurm:slurm "$RUNDIR" "$LOGDIR" /var/lib/slurm/slurmctld
  chmod 755 "$HOLD_DIR"
  start_munge
  local ctld slurmd
  ctld=$(running_pid $RUNDIR/slurmctld.pid slurmctld)
  slurmd=$(running_pid $RUNDIR/slurmd.pid slurmd)
  if [ "$changed" = 1 ] && { [ -n "$ctld" ] || [ -n "$slurmd" ]; }; then
    say "configuration changed: restarting slurmctld and slurmd"
    stop_daemons
    ctld=""; slurmd=""
  fi
  if [ -z "$ctld" ]; then
    /usr/sbin/slurmctld || die "slurmctld did not start; see $LOGDIR/slurmctld.log"
  fi
  if [ -z "$slurmd" ]; then
    /usr/sbin/slurmd || die "slurmd did not start; see $LOGDIR/slurmd.log"
  fi
  local deadline=$((SECONDS + TIMEOUT)) state="" resumed=0
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    case "$state" in
      idle|mixed|allocated|completing) break ;;
      down*|drain*|drained*|fail*)
        if [ "$resumed" = 0 ]; then
          say "node is $state; resuming it"
          scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    sleep 1
  done
  case "$state" in
    idle|mixed|allocated|completing) ;;
    *) die "node not idle after ${TIMEOUT}s (state: ${state:-no answer from slurmctld}); see $LOGDIR/slurmctld.log and $LOGDIR/slurmd.log" ;;
  esac
  say "up: node $(hostname -s) $state, partition debug (config $CONF)"
}

# A process that exists and is not a zombie (reaped late by a container's init).
alive() {
  [ -r "/proc/$1/stat" ] && ! sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | grep -q '^[ZX]'
}

# Stop a daemon by its pid file and wait for it to exit (SIGKILL after 15 s).
stop_one() {
  local pidfile=$1 name=$2 pid i
  pid=$(running_pid "$pidfile" "$name")
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 150); do
    alive "$pid" || { say "stopped $name ($pid)"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  say "killed $name ($pid)"
}

stop_daemons() {
  stop_one $RUNDIR/slurmd.pid slurmd
  stop_one $RUNDIR/slurmctld.pid slurmctld
}

down() {
  own_config
  need_root down
  stop_daemons
  stop_one /run/munge/munged.pid munged
  say "down"
}

status() {
  local ctld slurmd munged rc=0
  ctld=$(running_pid $RUNDIR/slurmctld.pid slurmctld)
  slurmd=$(running_pid $RUNDIR/slurmd.pid slurmd)
  munged=$(running_pid /run/munge/munged.pid munged)
  show() { if [ -n "$2" ]; then echo "$1 running (pid $2)"; else echo "$1 stopped"; fi; }
  show "munged:   " "$munged"
  show "slurmctld:" "$ctld"
  show "slurmd:   " "$slurmd"
  if [ -n "$ctld" ] && command -v sinfo >/dev/null; then
    sinfo || rc=1
    case "$(node_state)" in idle|mixed|allocated|completing) ;; *) rc=1 ;; esac
  else
    rc=1
  fi
  return $rc
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up [CPUS] | down | status" >&2; exit 2 ;;
esac
