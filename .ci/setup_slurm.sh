#!/usr/bin/env bash
# One-node Slurm cluster on this machine for the launcher tests (Debian's slurm-wlm + munge, run as root).
#
#   .ci/setup_slurm.sh          install (idempotent), configure, start munged/slurmctld/slurmd, wait until idle
#   .ci/setup_slurm.sh stop     stop the daemons this script started (by the pids it recorded)
#   .ci/setup_slurm.sh status   print the recorded pids and sinfo
#
# The node has 2 "GPUs" (gres gpu:2 backed by plain files) so GPU requests can be scheduled on a CPU box.
# State, logs and the pid file live in $SILKIE_SLURM_DIR (default /var/tmp/silkie-slurm).
set -euo pipefail

STATE=${SILKIE_SLURM_DIR:-/var/tmp/silkie-slurm}
PIDS="$STATE/daemons.pid"
CONF_DIR=/etc/slurm
NODE=$(hostname -s)

log() { echo "[setup_slurm] $*"; }

stop() {
    [ -f "$PIDS" ] || { log "no recorded daemons ($PIDS)"; return 0; }
    # reverse start order: slurmd, slurmctld, munged
    for pid in $(tac "$PIDS" | awk '{print $2}'); do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    rm -f "$PIDS"
    log "stopped"
}

running() {
    [ -f "$PIDS" ] || return 1
    local pid
    for pid in $(awk '{print $2}' "$PIDS"); do kill -0 "$pid" 2>/dev/null || return 1; done
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

configure() {
    mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/gpus" "$CONF_DIR"
    # jobs find their rendezvous host by node name (scontrol show hostnames): it must resolve
    getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts
    touch "$STATE/gpus/gpu0" "$STATE/gpus/gpu1"
    local mem_mb
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    cat >"$CONF_DIR/slurm.conf" <<EOF
# written by .ci/setup_slurm.sh: one-node test cluster
ClusterName=silkie-ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=5
# schedule pending (e.g. requeued) jobs within seconds, not the default minute
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=2 RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/gres.conf" <<EOF
NodeName=$NODE Name=gpu File=$STATE/gpus/gpu[0-1]
EOF
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    if pid=$(cat /run/munge/munged.pid 2>/dev/null) && kill -0 "$pid" 2>/dev/null; then
        log "munged already running (pid $pid)"
    else
        runuser -u munge -- /usr/sbin/munged
        for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
        pid=$(cat /run/munge/munged.pid)
    fi
    echo "munged $pid" >>"$PIDS"
}

start_daemon() {  # name pidfile command...
    local name=$1 pidfile=$2
    shift 2
    "$@"
    local pid=""
    for _ in $(seq 100); do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && break
        sleep 0.1
    done
    [ -n "$pid" ] || { log "$name did not start; see $STATE/$name.log"; tail -n 20 "$STATE/$name.log" >&2; exit 1; }
    echo "$name $pid" >>"$PIDS"
}

wait_idle() {
    for _ in $(seq 120); do
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
        case "$state" in
            idle | mixed | allocated) log "node $NODE is $state"; return 0 ;;
            down* | drain*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    log "node $NODE did not become idle (state: ${state:-unknown}); logs in $STATE"
    tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
    exit 1
}

start() {
    if running; then
        log "already running: $(tr '\n' ' ' <"$PIDS")"
        wait_idle
        return 0
    fi
    [ -f "$PIDS" ] && stop
    install
    mkdir -p "$STATE"
    configure
    : >"$PIDS"
    start_munge
    start_daemon slurmctld "$STATE/slurmctld.pid" /usr/sbin/slurmctld -c
    start_daemon slurmd "$STATE/slurmd.pid" /usr/sbin/slurmd -N "$NODE"
    wait_idle
    log "daemons: $(tr '\n' ' ' <"$PIDS")(pid file $PIDS)"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) cat "$PIDS" 2>/dev/null || true; sinfo 2>/dev/null || true ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
