#!/usr/bin/env bash
# The local rehearsal SLURM cluster: munged, slurmctld and two slurmd (nodes n1, n2) on this host.
#
#   scripts/slurm/cluster.sh install   apt-get install slurm-wlm munge when a command is missing
#   scripts/slurm/cluster.sh up        start what is not running (idempotent), wait until both nodes are idle
#   scripts/slurm/cluster.sh down      stop the daemons this script started (by the PIDs it recorded)
#   scripts/slurm/cluster.sh status    exit 0 when all four daemons run and the controller answers
#   scripts/slurm/cluster.sh env       the line to `eval` for sbatch/squeue/scontrol to find the cluster
#
# State (config, munge key and socket, controller state, spool, logs, PID files) lives in
# $DUS_CLUSTER_DIR (default <repo>/.cluster). A fresh `up` (nothing running) starts from empty
# controller state: job ids start at 1 again. Nothing outside that directory is written except
# /etc/hosts (n1 -> 127.0.1.1, n2 -> 127.0.1.2, one marked line each, left in place by `down`) and,
# when no other SLURM config is there, the symlink /etc/slurm/slurm.conf (removed by `down`), so
# that plain `scontrol show job` works in any shell.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
STATE="${DUS_CLUSTER_DIR:-$REPO/.cluster}"
CONF="$STATE/slurm.conf"
CTLD_PORT="${DUS_SLURMCTLD_PORT:-16817}"
N1_PORT="${DUS_SLURMD_PORT:-16818}"
N2_PORT="$((N1_PORT + 1))"
KILL_WAIT="${DUS_SLURM_KILL_WAIT:-30}"
HOSTS_MARK="# dus-pipeline local SLURM node"
NODES=(n1 n2)
declare -A NODE_ADDR=([n1]=127.0.1.1 [n2]=127.0.1.2)

say() { echo "[cluster] $*"; }
die() { echo "[cluster] error: $*" >&2; exit 1; }

missing_commands() {
  local c out=()
  for c in munged mungekey slurmctld slurmd sbatch squeue scontrol srun; do
    command -v "$c" >/dev/null 2>&1 || out+=("$c")
  done
  echo "${out[*]}"
}

cmd_install() {
  local missing
  missing="$(missing_commands)"
  if [[ -z "$missing" ]]; then
    say "slurm-wlm and munge are installed ($(slurmctld -V))"
    return 0
  fi
  local sudo=""
  if [[ "$(id -u)" != 0 ]]; then
    if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      msg="missing $missing; installing slurm-wlm and munge needs root: sudo apt-get install slurm-wlm munge"
      # In CI the cluster tests must run; elsewhere they skip and say why.
      if [[ "${CI:-}" == "true" ]]; then die "$msg"; fi
      say "warning: $msg (the cluster tests will skip)"
      return 0
    fi
  fi
  say "installing slurm-wlm and munge (missing: $missing)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq slurm-wlm munge >/dev/null
  [[ -z "$(missing_commands)" ]] || die "still missing after apt-get install: $(missing_commands)"
}

# pid_alive NAME: the PID recorded for NAME runs and is still that daemon (not a reused PID).
pid_alive() {
  local f="$STATE/pids/$1.pid" pid exe
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  [[ -d "/proc/$pid" ]] || return 1
  exe="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  [[ "$exe" == *"${2:-$1}"* && "$exe" == *"$STATE"* ]]
}

ensure_hosts() {
  local n
  for n in "${NODES[@]}"; do
    if ! grep -qE "^[0-9.]+[[:space:]]+$n([[:space:]]|\$)" /etc/hosts; then
      [[ -w /etc/hosts ]] || die "node $n is not in /etc/hosts and it is not writable: add '${NODE_ADDR[$n]} $n'"
      echo "${NODE_ADDR[$n]} $n $HOSTS_MARK" >>/etc/hosts
    fi
    getent hosts "$n" | grep -q "^${NODE_ADDR[$n]}[[:space:]]" \
      || die "/etc/hosts maps $n to $(getent hosts "$n" | awk '{print $1}'), not ${NODE_ADDR[$n]}"
  done
}

write_config() {
  mkdir -p "$STATE"/{munge,ctld,spool/n1,spool/n2,log,pids}
  chmod 700 "$STATE/munge"
  sed -e "s|@HOST@|$(hostname -s)|" -e "s|@STATE@|$STATE|g" -e "s|@CTLD_PORT@|$CTLD_PORT|" \
      -e "s|@N1_PORT@|$N1_PORT|" -e "s|@N2_PORT@|$N2_PORT|" -e "s|@KILL_WAIT@|$KILL_WAIT|" \
      "$HERE/slurm.conf.in" >"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  cp "$HERE/cgroup.conf" "$STATE/cgroup.conf"
  [[ -f "$STATE/munge/munge.key" ]] || mungekey --create --keyfile="$STATE/munge/munge.key"
  chmod 600 "$STATE/munge/munge.key"
  # Plain `scontrol`/`sbatch` in any shell: only when no other SLURM config is installed.
  if [[ -w /etc/slurm && ! -e /etc/slurm/slurm.conf ]]; then ln -s "$CONF" /etc/slurm/slurm.conf; fi
}

# start NAME CMD...: run a daemon in the foreground of its own session, record its PID.
start() {
  local name="$1"; shift
  setsid "$@" >>"$STATE/log/$name.out" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name.pid"
}

cmd_up() {
  [[ -z "$(missing_commands)" ]] || die "missing $(missing_commands): run \`make cluster-install\` (as root) first"
  local t0=$SECONDS fresh=1 n
  for n in munged slurmctld slurmd-n1 slurmd-n2; do pid_alive "$n" "${n%-*}" && fresh=0; done
  ensure_hosts
  write_config
  export SLURM_CONF="$CONF"
  if ! pid_alive munged; then
    start munged munged -F --force --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
      --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
    for _ in $(seq 50); do [[ -S "$STATE/munge/munge.socket" ]] && break; sleep 0.1; done
    [[ -S "$STATE/munge/munge.socket" ]] || die "munged did not start: $STATE/log/munged.log"
  fi
  if ! pid_alive slurmctld; then
    # A fresh cluster starts from empty state (job ids from 1); a restarted controller alone keeps it.
    if [[ $fresh == 1 ]]; then rm -rf "$STATE/ctld" && mkdir -p "$STATE/ctld"; fi
    start slurmctld slurmctld -D -i -f "$CONF"
  fi
  for n in "${NODES[@]}"; do
    pid_alive "slurmd-$n" slurmd || start "slurmd-$n" slurmd -D -N "$n" -f "$CONF"
  done
  # Both nodes idle (a node that was DOWN, e.g. after a fault test, is resumed).
  local state=""
  for _ in $(seq 60); do
    state="$(sinfo -h -N -p normal -o '%N %T' 2>/dev/null | sort | tr '\n' ' ' || true)"
    [[ "$state" == "n1 idle n2 idle " ]] && break
    if [[ "$state" == *down* || "$state" == *drain* ]]; then
      scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
    fi
    sleep 0.5
  done
  [[ "$state" == "n1 idle n2 idle " ]] || die "nodes not idle after 30 s (sinfo: '$state'); logs in $STATE/log/"
  say "up in $((SECONDS - t0)) s: slurmctld on 127.0.0.1:$CTLD_PORT, n1 (127.0.1.1:$N1_PORT), n2 (127.0.1.2:$N2_PORT)," \
      "partitions normal and preempt; state in $STATE"
  say "use it from a shell: eval \"\$($0 env)\"   (or SLURM_CONF=$CONF)"
}

cmd_down() {
  local n pid stopped=()
  for n in slurmd-n2 slurmd-n1 slurmctld munged; do
    if pid_alive "$n" "${n%-*}"; then
      pid="$(cat "$STATE/pids/$n.pid")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do [[ -d "/proc/$pid" ]] || break; sleep 0.1; done
      [[ -d "/proc/$pid" ]] && kill -9 "$pid" 2>/dev/null || true
      stopped+=("$n($pid)")
    fi
    rm -f "$STATE/pids/$n.pid"
  done
  if [[ -L /etc/slurm/slurm.conf && "$(readlink /etc/slurm/slurm.conf)" == "$CONF" ]]; then rm -f /etc/slurm/slurm.conf; fi
  say "stopped: ${stopped[*]:-nothing was running}"
}

cmd_status() {
  local n
  for n in munged slurmctld slurmd-n1 slurmd-n2; do
    pid_alive "$n" "${n%-*}" || { say "$n is not running"; return 1; }
  done
  SLURM_CONF="$CONF" scontrol ping >/dev/null 2>&1 || { say "slurmctld does not answer"; return 1; }
  SLURM_CONF="$CONF" sinfo -N -o '%N %P %T'
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|up|down|status|env" >&2; exit 2 ;;
esac
