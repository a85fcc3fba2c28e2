#!/usr/bin/env bash
# A real Slurm cluster with two virtual nodes (n1, n2) on this one machine, for CI and developers.
#
#   sudo bash scripts/slurm_local_cluster.sh          # install (apt, Debian/Ubuntu) if needed, start; prints sinfo
#   sudo bash scripts/slurm_local_cluster.sh status   # sinfo + daemon pids
#   sudo bash scripts/slurm_local_cluster.sh stop     # stop the daemons this script started (by pid file)
#   sudo bash scripts/slurm_local_cluster.sh clean    # stop, then remove its config, state, logs and hosts entry
#
# Safe to run twice: installed packages, a running munged/slurmctld/slurmd, the key and the hosts entry
# are detected and left alone; slurm.conf is rewritten only if this script wrote it (marker line) or
# it is absent (an existing foreign /etc/slurm/slurm.conf makes it stop, unless FORCE=1).
#
# What it sets up: munge (auth), slurmctld, and two slurmd daemons started as `slurmd -N n1` and
# `slurmd -N n2`, each listening on its own port, both NodeAddr=127.0.0.1 and NodeHostname=$(hostname).
# Process tracking is proctrack/linuxproc and TaskPlugin=task/none (no cgroups needed, works in
# containers), no accounting (use `scontrol show job`, not sacct). One partition `debug` (default)
# holds both nodes; each node offers this machine's CPUs; no GPUs (run jobs with TOOLKIT_CPU=1).
#
# Then, for example (see slurm/train.sbatch):
#   TOOLKIT_CPU=1 RECIPE=recipes/demo.yaml sbatch --nodes=2 slurm/train.sbatch model.name_or_path=...
#
# Environment: SLURM_LOCAL_PORT_BASE (default 6817: slurmctld, +1 n1's slurmd, +2 n2's slurmd),
# FORCE=1 (overwrite a slurm.conf this script did not write).
set -euo pipefail

ACTION=${1:-start}
MARKER="# written by whisper-toolkit scripts/slurm_local_cluster.sh"
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
RUN=/run/slurm-local
NODES=(n1 n2)
PORT_BASE=${SLURM_LOCAL_PORT_BASE:-6817}
HOST=$(hostname -s)

log() { echo "[slurm-local] $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then exec sudo -E bash "$0" "$@"; fi
    log "must run as root (or with sudo available)"; exit 1
fi

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing=()
    for cmd in munged mungekey slurmctld slurmd sbatch sinfo; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing slurm-wlm and munge (missing: ${missing[*]})"
    command -v apt-get >/dev/null || { log "no apt-get: install slurm-wlm and munge yourself"; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --force; else create-munge-key -f; fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    log "starting munged"
    if id munge >/dev/null 2>&1 && command -v runuser >/dev/null; then
        runuser -u munge -- munged || munged --force
    else
        munged --force
    fi
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not come up"; exit 1
}

hosts_entry() {
    local name
    for name in "${NODES[@]}"; do
        if ! getent hosts "$name" >/dev/null; then
            log "adding '127.0.0.1 $name' to /etc/hosts"
            echo "127.0.0.1 $name  # slurm_local_cluster.sh" >>/etc/hosts
        fi
    done
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF" && [[ ${FORCE:-0} != 1 ]]; then
        log "$CONF exists and was not written by this script; rerun with FORCE=1 to replace it"
        exit 1
    fi
    local cpus
    cpus=$(nproc)
    mkdir -p "$CONF_DIR" "$STATE" "$LOGS" "$RUN" "${NODES[@]/#/$SPOOL/}"
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$MARKER
ClusterName=toolkit-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays the restart of a requeued job (default 120 s): short for quick CI
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# a requeued job becomes eligible by time, which only the periodic passes notice (default 60 s / 30 s)
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
KillWait=30
Waittime=0
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
NodeName=${NODES[0]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT_BASE + 1)) CPUs=$cpus State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT_BASE + 2)) CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        CONF_CHANGED=0
        return
    fi
    log "writing $CONF"
    mv "$tmp" "$CONF"
    chmod 644 "$CONF"
    CONF_CHANGED=1
}

start_daemons() {
    local changed=$1 node
    if [[ $changed == 1 ]] && pid_alive "$RUN/slurmctld.pid"; then
        # not `scontrol reconfigure`: it does not apply AuthInfo (cred_expire); jobs survive a restart
        log "slurm.conf changed: restarting the daemons"
        stop_daemons
    fi
    if ! pid_alive "$RUN/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld
    fi
    for node in "${NODES[@]}"; do
        if ! pid_alive "$RUN/slurmd-$node.pid"; then
            log "starting slurmd -N $node"
            slurmd -N "$node"
        fi
    done
}

wait_idle() {
    local state
    for _ in $(seq 60); do
        state=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
        if [[ $(grep -cE ' (idle|mix|alloc)' <<<"$state") -eq ${#NODES[@]} ]]; then return 0; fi
        # a node left DOWN/DRAINED by an earlier run (e.g. after `stop`) comes back here
        for node in "${NODES[@]}"; do
            if grep -qE "^$node (down|drain|drng|fail)" <<<"$state"; then
                scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
            fi
        done
        sleep 1
    done
    log "nodes did not become idle:"; sinfo -N -l || true; exit 1
}

stop_daemons() {
    local pidfile pid
    for pidfile in "$RUN"/slurmd-*.pid "$RUN/slurmctld.pid"; do
        [[ -s $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            log "stopping $(basename "$pidfile" .pid) (pid $pid)"
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
        rm -f "$pidfile"
    done
}

case $ACTION in
start)
    install_packages
    start_munge
    hosts_entry
    write_conf
    start_daemons "$CONF_CHANGED"
    wait_idle
    sinfo
    ;;
status)
    for f in "$RUN"/*.pid; do [[ -s $f ]] && echo "$(basename "$f" .pid): $(cat "$f")"; done
    sinfo
    ;;
stop)
    stop_daemons
    ;;
clean)
    stop_daemons
    if [[ -f $CONF ]] && grep -qF "$MARKER" "$CONF"; then rm -f "$CONF"; fi
    rm -rf "$STATE" "$SPOOL" "$LOGS" "$RUN"
    # rewritten in place (not sed -i): /etc/hosts is often a bind mount in containers
    hosts=$(grep -v '# slurm_local_cluster.sh$' /etc/hosts || true)
    printf '%s\n' "$hosts" >/etc/hosts
    ;;
*)
    echo "usage: $0 [start|status|stop|clean]" >&2; exit 2 ;;
esac
