#!/bin/bash
# Stand up / tear down a real single-node SLURM on localhost, as root.
#
#   tests/slurm/local_slurm.sh start    install (if missing), configure, start, wait for idle node
#   tests/slurm/local_slurm.sh stop     cancel all jobs, kill the daemons by pid, clean up
#   tests/slurm/local_slurm.sh status   print whether it is up (exit 0 up, 1 down)
#
# Flow of `start`:
#
#   apt-get (once)  ->  $CW_SLURM_DIR/{munge.key, slurm.conf}  ->  /etc/slurm/slurm.conf (copy)
#        munged  --socket $DIR/munge/munge.socket.2  (slurm.conf: AuthInfo=socket=...)
#        slurmctld -D  ---\   pids in $DIR/pids/*.pid, logs in $DIR/log/*.log
#        slurmd    -D  ---/   poll `sinfo` until the node is idle (bounded)
#
# Meant for throwaway test machines (CI, dev VMs): it writes /etc/slurm/slurm.conf so that
# plain `sbatch`/`squeue`/`scancel` work in any later shell.  Never run it on a real cluster.
# State dir: $CW_SLURM_DIR (default /tmp/cw-slurm).  Start timeout: $CW_SLURM_TIMEOUT (s, default 60).
set -euo pipefail

DIR="${CW_SLURM_DIR:-/tmp/cw-slurm}"
TIMEOUT="${CW_SLURM_TIMEOUT:-60}"
ETC_CONF=/etc/slurm/slurm.conf
MARKER="# written by cw tests/slurm/local_slurm.sh"
DAEMONS=(munged slurmctld slurmd)
NODE="$(hostname -s)"

log() { echo "local_slurm: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- installation ---------------------------------------------------------------------------

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "must run as root to install ${missing[*]}"
    log "installing ${missing[*]}"
    if [ ! -e /usr/sbin/policy-rc.d ]; then  # keep package scripts from starting daemons
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$DIR/apt.log" 2>&1; then
        log "apt-get install failed, running apt-get update once"
        apt-get update -q >>"$DIR/apt.log" 2>&1 || { tail -20 "$DIR/apt.log" >&2; die "apt-get update failed"; }
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$DIR/apt.log" 2>&1 \
            || { tail -20 "$DIR/apt.log" >&2; die "apt-get install failed"; }
    fi
}

# --- configuration --------------------------------------------------------------------------

real_memory_mb() { awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo; }

write_config() {
    mkdir -p "$DIR"/{munge,pids,log,state,spool}
    chmod 700 "$DIR/munge"
    # munged refuses world-writable parents unless sticky; /tmp is sticky, $DIR is 755.
    chmod 755 "$DIR"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    cat > "$DIR/slurm.conf" <<EOF
$MARKER (state in $DIR)
ClusterName=cwtest
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/pids/slurmctld.pid
SlurmdPidFile=$DIR/pids/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=16 RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
    mkdir -p /etc/slurm
    if [ -e "$ETC_CONF" ] && ! grep -qF "$MARKER" "$ETC_CONF"; then
        die "$ETC_CONF exists and was not written by this script; refusing to overwrite it"
    fi
    cp "$DIR/slurm.conf" "$ETC_CONF"
}

# --- processes ------------------------------------------------------------------------------

# alive PID: true if PID exists and is not a zombie (dead children linger as zombies).
alive() {
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

pid_of() { cat "$DIR/pids/$1.pid" 2>/dev/null || true; }

daemon_up() { local pid; pid="$(pid_of "$1")"; [ -n "$pid" ] && alive "$pid"; }

# launch NAME CMD...: run CMD in the foreground mode of the daemon, detached, record its pid.
launch() {
    local name="$1"; shift
    setsid "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! > "$DIR/pids/$name.pid"
}

# wait_for DESCRIPTION CMD...: poll CMD every 0.1 s until it succeeds or $TIMEOUT elapses.
wait_for() {
    local what="$1"; shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@"; do
        if [ $SECONDS -ge $deadline ]; then
            log "timed out after ${TIMEOUT}s waiting for $what"; show_logs; return 1
        fi
        for d in "${DAEMONS[@]}"; do
            if [ -n "$(pid_of "$d")" ] && ! daemon_up "$d"; then
                log "$d died while waiting for $what"; show_logs; return 1
            fi
        done
        sleep 0.1
    done
}

show_logs() {
    for f in "$DIR"/log/*; do [ -s "$f" ] && { echo "--- $f" >&2; tail -15 "$f" >&2; }; done
    return 0
}

node_idle() { [ "$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null)" = idle ]; }

munge_ok() { [ -S "$DIR/munge/munge.socket.2" ] && munge -n -S "$DIR/munge/munge.socket.2" >/dev/null 2>&1; }

is_up() {
    for d in "${DAEMONS[@]}"; do daemon_up "$d" || return 1; done
    node_idle_or_busy
}

node_idle_or_busy() {
    local s; s="$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null)" || return 1
    case "$s" in idle|mixed|allocated|completing) return 0;; *) return 1;; esac
}

# --- commands -------------------------------------------------------------------------------

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    local t0=$SECONDS start_ns; start_ns=$(date +%s%N)
    if [ -d "$DIR" ] && is_up 2>/dev/null; then log "already up (state in $DIR)"; return 0; fi
    [ -d "$DIR" ] && { log "stale state in $DIR, cleaning up first"; cmd_stop; }
    mkdir -p "$DIR"
    install_packages
    write_config
    [ -d /sys/fs/cgroup ] || die "/sys/fs/cgroup is missing; slurmd needs it mounted"
    launch munged munged --foreground --force \
        --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munge.seed"
    wait_for "munged" munge_ok
    launch slurmctld slurmctld -D -c -f "$DIR/slurm.conf"
    launch slurmd slurmd -D -f "$DIR/slurm.conf"
    wait_for "node $NODE idle in sinfo" node_idle
    local ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
    log "up in ${ms} ms: node $NODE idle (state in $DIR, config $ETC_CONF)"
}

# cancel_all_jobs: cancel every job and wait (bounded) until squeue shows none, so that no
# slurmstepd or job process is left behind when the daemons go away.
cancel_all_jobs() {
    daemon_up slurmctld || return 0
    local jobs; jobs="$(squeue -h -o %i 2>/dev/null || true)"
    [ -z "$jobs" ] && return 0
    log "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel --full $jobs 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while [ -n "$(squeue -h -o %i 2>/dev/null || true)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    jobs="$(squeue -h -o %i 2>/dev/null || true)"
    # shellcheck disable=SC2086
    [ -n "$jobs" ] && { log "jobs still listed, sending KILL: $(echo $jobs)"; scancel -s KILL --full $jobs || true; }
    return 0
}

# stop_daemon NAME: TERM by pid, wait (bounded), then KILL.
stop_daemon() {
    local name="$1" pid; pid="$(pid_of "$name")"
    [ -n "$pid" ] || return 0
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 10))
        while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
        if alive "$pid"; then log "$name ($pid) ignored TERM, killing"; kill -KILL "$pid" 2>/dev/null || true; fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$DIR/pids/$name.pid"
}

cmd_stop() {
    if [ ! -d "$DIR" ]; then log "not running (no $DIR)"; return 0; fi
    cancel_all_jobs
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    if [ -e "$ETC_CONF" ] && grep -qF "$MARKER (state in $DIR)" "$ETC_CONF"; then rm -f "$ETC_CONF"; fi
    rm -rf "$DIR"
    log "stopped and removed $DIR"
}

cmd_status() {
    local d pid
    for d in "${DAEMONS[@]}"; do
        pid="$(pid_of "$d")"
        if daemon_up "$d"; then echo "$d: running (pid $pid)"; else echo "$d: not running"; fi
    done
    if is_up 2>/dev/null; then
        echo "slurm: up, node $NODE $(sinfo -h -N -n "$NODE" -o %T)"; return 0
    fi
    echo "slurm: down"; return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status   (state dir \$CW_SLURM_DIR, default /tmp/cw-slurm)" >&2; exit 2 ;;
esac
