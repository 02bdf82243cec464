#!/bin/bash
# Stand up / tear down a real SLURM of three nodes on this machine, as root.
#
#   tests/slurm/local_slurm.sh start    install (if missing), configure, start, wait for idle nodes
#   tests/slurm/local_slurm.sh stop     cancel all jobs, kill the daemons by pid, clean up
#   tests/slurm/local_slurm.sh status   print whether it is up (exit 0 up, 1 down)
#
# The nodes (as on a cluster: one filesystem, own hostnames and addresses):
#
#   this machine, root namespace: node $(hostname -s), bridge cwslurm78 10.78.0.1/24
#        munged, slurmctld, slurmd          (SlurmctldHost / NodeAddr 10.78.0.1)
#   network namespace cwslurm78-2: node cwnode2, eth0 10.78.0.2 (veth cwslurm78-2 on the bridge)
#   network namespace cwslurm78-3: node cwnode3, eth0 10.78.0.3
#        slurmd -N cwnodeK, run as  nsenter --net=/run/netns/...  unshare --uts --mount:
#        its hostname is cwnodeK and it sees $DIR/hosts bound on /etc/hosts; every job it
#        starts inherits both, and shares /, /tmp, /root and the pids with the machine.
#   /etc/hosts of the machine gains "10.78.0.K cwnodeK" lines (marked, removed by stop);
#   $DIR/hosts names every node at its bridge address, so any node reaches any other.
#   A shell on a node:  nsenter --net=/run/netns/cwslurm78-2 unshare --uts --mount sh -c \
#        'hostname cwnode2; mount --bind /tmp/cw-slurm/hosts /etc/hosts; exec bash'
#
# Flow of `start`:
#
#   apt-get (once)  ->  $CW_SLURM_DIR/{munge.key, slurm.conf, hosts}  ->  /etc/slurm/slurm.conf
#        bridge + namespaces + veths, /etc/hosts lines
#        munged  --socket $DIR/munge/munge.socket.2  (slurm.conf: AuthInfo=socket=...)
#        slurmctld -D  ---\   pids in $DIR/pids/*.pid, logs in $DIR/log/*.log
#        slurmd    -D  ---+  one per node; poll `sinfo` until every node is idle (bounded)
#
# Meant for throwaway test machines (CI, dev VMs): it writes /etc/slurm/slurm.conf and lines
# of /etc/hosts so that plain `sbatch`/`squeue`/`scancel` work in any later shell.  Never run
# it on a real cluster.
# Settings (environment): CW_SLURM_DIR state dir (default /tmp/cw-slurm), CW_SLURM_TIMEOUT
# start timeout (s, default 60), CW_SLURM_NODES extra nodes (default 2; 0: one node on
# 127.0.0.1), CW_SLURM_NET second octet of the subnet 10.N.0.0/24 (default 78), CW_SLURM_PREFIX
# the extra nodes' name prefix (default cwnode), CW_SLURM_PORT slurmctld's port (default 6817,
# slurmd's is the next), CW_SLURM_ETC=0 leaves /etc/slurm/slurm.conf alone (then use
# SLURM_CONF=$DIR/slurm.conf): with another DIR, NET, PREFIX and PORT a second instance runs
# beside the first.
set -euo pipefail

DIR="${CW_SLURM_DIR:-/tmp/cw-slurm}"
TIMEOUT="${CW_SLURM_TIMEOUT:-60}"
ETC_CONF=/etc/slurm/slurm.conf
MARKER="# written by cw tests/slurm/local_slurm.sh"
NODE="$(hostname -s)"
EXTRA="${CW_SLURM_NODES:-2}"
NET="${CW_SLURM_NET:-78}"
PREFIX="${CW_SLURM_PREFIX:-cwnode}"
PORT="${CW_SLURM_PORT:-6817}"
WRITE_ETC="${CW_SLURM_ETC:-1}"
SUBNET="10.$NET.0"
BRIDGE="cwslurm$NET"
HOSTS_MARK="# cw-slurm $DIR"
EXTRA_NODES=()
for ((k = 2; k <= EXTRA + 1; k++)); do EXTRA_NODES+=("$PREFIX$k"); done
ALL_NODES=("$NODE" "${EXTRA_NODES[@]}")
DAEMONS=(munged slurmctld slurmd)
for n in "${EXTRA_NODES[@]}"; do DAEMONS+=("slurmd-$n"); done
if [ "$EXTRA" -gt 0 ]; then CTL_ADDR="$SUBNET.1"; else CTL_ADDR=127.0.0.1; fi

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
    mkdir -p "$DIR"/{munge,pids,run,log,state,spool}
    local node; for node in "${ALL_NODES[@]}"; do mkdir -p "$DIR/spool/$node"; done
    chmod 700 "$DIR/munge"
    # munged refuses world-writable parents unless sticky; /tmp is sticky, $DIR is 755.
    chmod 755 "$DIR"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    local nodes_line="" k=2 n mem; mem="$(real_memory_mb)"
    for n in "${EXTRA_NODES[@]}"; do
        nodes_line+="NodeName=$n NodeAddr=$SUBNET.$k CPUs=8 RealMemory=$mem State=UNKNOWN"$'\n'
        k=$((k + 1))
    done
    local partition_nodes; partition_nodes="$(IFS=,; echo "${ALL_NODES[*]}")"
    cat > "$DIR/slurm.conf" <<EOF
$MARKER (state in $DIR)
ClusterName=cwtest
SlurmctldHost=${NODE}(${CTL_ADDR})
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
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
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/pids/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${NODE} NodeAddr=${CTL_ADDR} CPUs=16 RealMemory=$mem State=UNKNOWN
${nodes_line}PartitionName=debug Nodes=${partition_nodes} Default=YES MaxTime=INFINITE State=UP
EOF
    # every node's /etc/hosts (bound over it in the namespaces): each name at its bridge address
    { echo "127.0.0.1 localhost"; echo "$CTL_ADDR $NODE"
      k=2; for n in "${EXTRA_NODES[@]}"; do echo "$SUBNET.$k $n"; k=$((k + 1)); done
    } > "$DIR/hosts"
    [ "$WRITE_ETC" = 1 ] || return 0
    mkdir -p /etc/slurm
    if [ -e "$ETC_CONF" ] && ! grep -qF "$MARKER" "$ETC_CONF"; then
        die "$ETC_CONF exists and was not written by this script; refusing to overwrite it"
    fi
    cp "$DIR/slurm.conf" "$ETC_CONF"
}

# --- network: a bridge on this machine, a namespace with a veth on it per extra node ----------

# run as host $1 with $2 on /etc/hosts, then exec the rest (in a fresh UTS + mount namespace)
NS_HOST='hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'

FORWARD_RULE=(-i "$BRIDGE" -o "$BRIDGE" -j ACCEPT)

ns_of() { echo "$BRIDGE-${1#"$PREFIX"}"; }   # cwnode2 -> cwslurm78-2

setup_network() {
    [ "$EXTRA" -gt 0 ] || return 0
    teardown_network  # what a killed instance of this DIR left
    command -v ip >/dev/null && command -v nsenter >/dev/null \
        || die "extra nodes need ip (iproute2) and nsenter (util-linux); CW_SLURM_NODES=0 for one node"
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local k=2 n ns
    for n in "${EXTRA_NODES[@]}"; do
        ns="$(ns_of "$n")"
        ip netns add "$ns"
        ip link add "$ns" type veth peer name eth0 netns "$ns"
        ip link set "$ns" master "$BRIDGE" up
        ip -n "$ns" addr add "$SUBNET.$k/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        k=$((k + 1))
    done
    # bridged packets go through iptables' FORWARD when br_netfilter is on, and dockerd
    # sets that chain's policy to DROP: let the nodes' traffic pass (removed by stop)
    if command -v iptables >/dev/null && ! iptables -C FORWARD "${FORWARD_RULE[@]}" 2>/dev/null; then
        iptables -I FORWARD "${FORWARD_RULE[@]}" 2>/dev/null || log "cannot add an iptables FORWARD rule (nodes may not reach each other if FORWARD drops)"
    fi
    remove_hosts_lines
    k=2; for n in "${EXTRA_NODES[@]}"; do echo "$SUBNET.$k $n $HOSTS_MARK" >> /etc/hosts; k=$((k + 1)); done
}

# remove_hosts_lines: drop this instance's lines, rewriting /etc/hosts in place (not sed -i,
# which replaces the file: it may be a bind mount)
remove_hosts_lines() {
    grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null || return 0
    local kept; kept="$(grep -vF "$HOSTS_MARK" /etc/hosts)"
    printf '%s\n' "$kept" > /etc/hosts
}

teardown_network() {
    local n ns pids
    for n in "${EXTRA_NODES[@]}"; do
        ns="$(ns_of "$n")"
        [ -e "/run/netns/$ns" ] || continue
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        # shellcheck disable=SC2086
        [ -n "$pids" ] && { log "killing what is left in $ns: $(echo $pids)"; kill -KILL $pids 2>/dev/null || true; }
        ip netns del "$ns" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
    if command -v iptables >/dev/null; then
        while iptables -D FORWARD "${FORWARD_RULE[@]}" 2>/dev/null; do :; done
    fi
    remove_hosts_lines
    return 0
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

# nodes_in STATE...: true if every node of this instance is in one of the STATEs
nodes_in() {
    local states n s; states="$(sinfo -h -N -o '%N %T' 2>/dev/null)" || return 1
    for n in "${ALL_NODES[@]}"; do
        s="$(awk -v n="$n" '$1 == n {print $2; exit}' <<<"$states")"
        s="${s%%[^a-z]*}"  # idle* (not responding), mixed~ (powered down), ...: the word
        [ -n "$s" ] && [[ " $* " == *" $s "* ]] || return 1
    done
}
node_idle() { nodes_in idle; }

munge_ok() { [ -S "$DIR/munge/munge.socket.2" ] && munge -n -S "$DIR/munge/munge.socket.2" >/dev/null 2>&1; }

is_up() {
    for d in "${DAEMONS[@]}"; do daemon_up "$d" || return 1; done
    node_idle_or_busy
}

node_idle_or_busy() { nodes_in idle mixed allocated completing; }

# --- commands -------------------------------------------------------------------------------

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    local t0=$SECONDS start_ns; start_ns=$(date +%s%N)
    if [ -d "$DIR" ] && is_up 2>/dev/null; then log "already up (state in $DIR)"; return 0; fi
    [ -d "$DIR" ] && { log "stale state in $DIR, cleaning up first"; cmd_stop; }
    mkdir -p "$DIR"
    install_packages
    write_config
    setup_network
    [ -d /sys/fs/cgroup ] || die "/sys/fs/cgroup is missing; slurmd needs it mounted"
    launch munged munged --foreground --force \
        --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munge.seed"
    wait_for "munged" munge_ok
    launch slurmctld slurmctld -D -c -f "$DIR/slurm.conf"
    launch slurmd slurmd -D -f "$DIR/slurm.conf"
    local n
    for n in "${EXTRA_NODES[@]}"; do  # own network, hostname and /etc/hosts; the same files
        launch "slurmd-$n" nsenter --net="/run/netns/$(ns_of "$n")" \
            unshare --uts --mount --propagation private sh -c "$NS_HOST" sh "$n" "$DIR/hosts" \
            slurmd -D -f "$DIR/slurm.conf" -N "$n"
    done
    wait_for "nodes ${ALL_NODES[*]} idle in sinfo" node_idle
    local ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
    log "up in ${ms} ms: nodes ${ALL_NODES[*]} idle (state in $DIR, config $DIR/slurm.conf)"
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
    if [ ! -d "$DIR" ]; then teardown_network; log "not running (no $DIR)"; return 0; fi
    cancel_all_jobs
    local n
    for n in "${EXTRA_NODES[@]}"; do stop_daemon "slurmd-$n"; done
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    teardown_network
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
        echo "slurm: up, nodes: $(sinfo -h -N -o '%N %T' | tr '\n' ' ')"; return 0
    fi
    echo "slurm: down"; return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status   (state dir \$CW_SLURM_DIR, default /tmp/cw-slurm)" >&2; exit 2 ;;
esac
