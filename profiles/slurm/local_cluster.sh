#!/usr/bin/env bash
# A throwaway single-node Slurm cluster on localhost, to try the cluster path of the workflow
# (snakemake --workflow-profile profiles/slurm) on one machine. Debian/Ubuntu, as root.
#
#   sudo profiles/slurm/local_cluster.sh start    # install packages if missing, start daemons
#   snakemake --workflow-profile profiles/slurm   # sbatch, squeue, sacct now reach it
#   sudo profiles/slurm/local_cluster.sh stop     # stop exactly the daemons `start` started
#   profiles/slurm/local_cluster.sh status
#
# Everything lives in one state directory ($PRVR_SLURM_DIR, default /tmp/prvr-slurm): slurm.conf,
# gres.conf, slurmdbd.conf, a private munge key and socket, a private MariaDB, spool, logs and
# the PIDs of the daemons it started. No system service is started or reconfigured. The one
# file written outside it is the symlink /etc/slurm/slurm.conf -> <state>/etc/slurm.conf,
# removed again by `stop`: Snakemake's job step plugin clears SLURM_* variables (SLURM_CONF
# too) before the `srun` inside each job, so that srun must find the config at the default
# path. `start` refuses to run on a machine that already has an /etc/slurm/slurm.conf.
#
# The node advertises fake GPUs (gres gpu:fake:1 with File=/dev/null; PRVR_SLURM_GPUS=N: N empty
# files) so that jobs asking for --gpus=1 are scheduled; they run on the CPU (CUDA_VISIBLE_DEVICES
# is set, but there is no CUDA device: `device: auto` picks the CPU).
#
# Accounting (slurmdbd + MariaDB) is on by default because Snakemake's Slurm plugin polls job
# states with `sacct`, which fails without slurmdbd (Snakemake then waits forever).
# PRVR_SLURM_ACCOUNTING=0 skips both daemons: finished jobs then stay in `squeue` for
# MinJobAge=600 s and Snakemake must be told `--slurm-status-command squeue` (with
# --slurm-init-seconds-before-status-checks <= 200).
#
# Settings (environment): PRVR_SLURM_DIR, PRVR_SLURM_PORT (first of four consecutive ports:
# slurmctld, slurmd, slurmdbd, mariadb; default 16817), PRVR_SLURM_ACCOUNTING (1|0),
# PRVR_SLURM_CPUS (CPUs the node offers; default nproc, at least 2; more than the machine has
# lets more jobs overlap), PRVR_SLURM_GPUS (fake GPUs, default 1), PRVR_SLURM_TIMEOUT (seconds
# per wait, default 60).
set -euo pipefail

STATE=${PRVR_SLURM_DIR:-/tmp/prvr-slurm}
PORT=${PRVR_SLURM_PORT:-16817}
ACCOUNTING=${PRVR_SLURM_ACCOUNTING:-1}
TIMEOUT=${PRVR_SLURM_TIMEOUT:-60}
CLUSTER=prvrlocal
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)
DB_PACKAGES=(slurmdbd mariadb-server)
# Daemons in start order; stop goes in reverse.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

CONF=$STATE/etc/slurm.conf
SYSCONF=/etc/slurm/slurm.conf
RUN=$STATE/run
LOG=$STATE/log

die() {
    echo "local_cluster.sh: error: $*" >&2
    exit 1
}
say() { echo "local_cluster.sh: $*" >&2; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' must run as root (it installs packages and starts daemons)"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s until it succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            say "timed out after ${secs}s waiting for $what"
            return 1
        fi
        sleep 0.5
    done
}

alive() { # alive NAME [STATE]: the recorded PID still runs daemon NAME of that state directory
    local state=${2:-$STATE}
    local pidfile=$state/run/$1.started pid comm environ
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$1" ]] || return 1
    # Guard against PID reuse: the process must carry this state directory's marker.
    environ=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ") || return 1
    grep -qxF "PRVR_SLURM_STATE=$state" <<<"$environ"
}

# check_sysconf: /etc/slurm/slurm.conf must be absent, ours, or a leftover link of a
# local_cluster.sh whose daemons are all gone (e.g. the machine was reset); never anything else.
check_sysconf() {
    [[ -e $SYSCONF || -L $SYSCONF ]] || return 0
    local target other d
    target=$(readlink "$SYSCONF") ||
        die "$SYSCONF exists: this machine already has a Slurm configuration; not touching it"
    [[ $target == "$CONF" ]] && return 0
    [[ $target == */etc/slurm.conf ]] ||
        die "$SYSCONF links to $target: a Slurm configuration that is not ours; not touching it"
    if [[ -e $target ]] && ! grep -qs "Written by profiles/slurm/local_cluster.sh" "$target"; then
        die "$SYSCONF links to $target, not written by local_cluster.sh; not touching it"
    fi
    other=${target%/etc/slurm.conf}
    for d in "${DAEMONS[@]}"; do
        alive "$d" "$other" && die "another local cluster runs from $other; stop it first" \
            "(PRVR_SLURM_DIR=$other $0 stop)"
    done
    say "removing the stale link $SYSCONF -> $target"
    rm -f "$SYSCONF"
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

install_packages() {
    local pkgs=("${PACKAGES[@]}") missing=()
    [[ $ACCOUNTING == 1 ]] && pkgs+=("${DB_PACKAGES[@]}")
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get"
    say "installing ${missing[*]} (apt-get)"
    local t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    # Packages must not start their services: a policy-rc.d is honoured by invoke-rc.d.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$STATE/apt.log" 2>&1; then
        apt-get update -q >>"$STATE/apt.log" 2>&1 || true
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$STATE/apt.log" 2>&1 || {
            ((made_policy)) && rm -f "$policy"
            tail -20 "$STATE/apt.log" >&2
            die "apt-get install failed (log: $STATE/apt.log)"
        }
    fi
    ((made_policy)) && rm -f "$policy"
    say "installed in $((SECONDS - t0))s"
}

# launch NAME COMMAND...: start a daemon in the foreground of its own session, record its PID.
launch() {
    local name=$1
    shift
    PRVR_SLURM_STATE=$STATE SLURM_CONF=$CONF setsid "$@" </dev/null >"$LOG/$name.out" 2>&1 &
    echo $! >"$RUN/$name.started"
    sleep 0.2
    alive "$name" || {
        tail -20 "$LOG/$name.out" >&2 || true
        die "$name exited at once (log: $LOG/$name.out)"
    }
}

write_configs() {
    local cpus mem_mb gpus=${PRVR_SLURM_GPUS:-1}
    cpus=${PRVR_SLURM_CPUS:-$(nproc)}
    ((cpus < 2)) && cpus=2
    [[ $gpus =~ ^[1-9][0-9]*$ ]] || die "PRVR_SLURM_GPUS must be a positive integer, not '$gpus'"
    # Memory is not a consumable here (CR_Core): RealMemory only has to admit --mem requests.
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    ((mem_mb < 16384)) && mem_mb=16384
    local acct="AccountingStorageType=accounting_storage/none"
    if [[ $ACCOUNTING == 1 ]]; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$RUN/munge.socket
JobAcctGatherType=jobacct_gather/linux
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment"
    fi
    cat >"$CONF" <<EOF
# Written by profiles/slurm/local_cluster.sh: a single-node test cluster on localhost.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$RUN/munge.socket
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
GresTypes=gpu
$acct
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:fake:$gpus State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    # Fake GPUs: Slurm counts a GPU per device file; one is /dev/null, more are empty files.
    local files=/dev/null i
    if ((gpus > 1)); then
        mkdir -p "$STATE/dev"
        for ((i = 0; i < gpus; i++)); do : >"$STATE/dev/fakegpu$i"; done
        files="$STATE/dev/fakegpu[0-$((gpus - 1))]"
    fi
    echo "NodeName=localhost Name=gpu Type=fake File=$files" >"$STATE/etc/gres.conf"
    if [[ $ACCOUNTING == 1 ]]; then
        cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$RUN/munge.socket
DbdHost=localhost
DbdPort=$((PORT + 2))
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
        chmod 600 "$STATE/etc/slurmdbd.conf"
    fi
}

start_munge() {
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$STATE/munge/munge.key"
    launch munged /usr/sbin/munged --foreground --force \
        --socket="$RUN/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" \
        --seed-file="$STATE/munge/munged.seed"
    wait_for "$TIMEOUT" munged bash -c "munge -n -S '$RUN/munge.socket' | unmunge -S '$RUN/munge.socket'"
}

start_mariadb() {
    mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" \
        --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.out" 2>&1 ||
        die "mariadb-install-db failed (log: $LOG/mariadb-install.out)"
    launch mariadbd /usr/sbin/mariadbd --no-defaults --user=root --datadir="$STATE/mysql" \
        --socket="$RUN/mysqld.sock" --port=$((PORT + 3)) --bind-address=127.0.0.1 \
        --skip-name-resolve --pid-file="$RUN/mysqld.pid" --log-error="$LOG/mariadb.log" \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M
    wait_for "$TIMEOUT" mariadbd mariadb-admin --no-defaults --socket="$RUN/mysqld.sock" ping
    mariadb --no-defaults --socket="$RUN/mysqld.sock" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

cmd_start() {
    need_root start
    for d in "${DAEMONS[@]}"; do
        alive "$d" && die "a cluster already runs from $STATE ($d); run '$0 stop' first"
    done
    check_sysconf
    for p in $PORT $((PORT + 1)) $((PORT + 2)) $((PORT + 3)); do
        port_free "$p" || die "port $p is in use (set PRVR_SLURM_PORT to a free range of 4)"
    done
    local t0=$SECONDS
    if [[ -e $STATE ]]; then
        # Only ever delete a state directory this script wrote (or an empty one).
        grep -qs "Written by profiles/slurm/local_cluster.sh" "$CONF" || [[ -z $(ls -A "$STATE") ]] ||
            die "$STATE exists and is not a local_cluster.sh state directory; choose another PRVR_SLURM_DIR"
        rm -rf "$STATE"
    fi
    mkdir -p "$STATE"/{etc,spool/ctld,spool/d,munge,mysql} "$RUN" "$LOG"
    chmod 700 "$STATE" "$STATE/munge"
    install_packages
    local t1=$SECONDS
    write_configs
    mkdir -p "$(dirname "$SYSCONF")"
    ln -sfn "$CONF" "$SYSCONF"
    start_munge
    if [[ $ACCOUNTING == 1 ]]; then
        start_mariadb
        launch slurmdbd /usr/sbin/slurmdbd -D
        wait_for "$TIMEOUT" slurmdbd env SLURM_CONF="$CONF" sacctmgr -i list cluster
        # Register the cluster before slurmctld starts, so its first jobs are recorded.
        SLURM_CONF=$CONF sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    fi
    local t2=$SECONDS
    launch slurmctld /usr/sbin/slurmctld -D -i -f "$CONF"
    wait_for "$TIMEOUT" slurmctld env SLURM_CONF="$CONF" scontrol ping
    launch slurmd /usr/sbin/slurmd -D -N localhost -f "$CONF"
    wait_for "$TIMEOUT" "node localhost to be idle" \
        bash -c "SLURM_CONF='$CONF' sinfo -h -n localhost -o %T | grep -qx idle"
    # Smoke test: a job runs, and (with accounting) sacct knows about it.
    SLURM_CONF=$CONF timeout "$TIMEOUT" srun --quiet -N1 -n1 --gpus=1 true ||
        die "a test job (srun --gpus=1 true) failed; logs in $LOG"
    if [[ $ACCOUNTING == 1 ]]; then
        wait_for "$TIMEOUT" "sacct to list the test job" \
            bash -c "SLURM_CONF='$CONF' sacct -n -X -o State | grep -q COMPLETED"
    fi
    say "cluster '$CLUSTER' up in $((SECONDS - t1))s (packages $((t1 - t0))s, munge+accounting" \
        "$((t2 - t1))s, slurmctld+slurmd+test job $((SECONDS - t2))s); state in $STATE"
    say "config: $CONF (linked from $SYSCONF); logs: $LOG"
}

stop_pid() { # stop_pid NAME: TERM, wait, KILL — only if the recorded PID still runs NAME
    local name=$1 pid
    alive "$name" || {
        rm -f "$RUN/$name.started"
        return 0
    }
    pid=$(<"$RUN/$name.started")
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while alive "$name" && ((SECONDS < deadline)); do sleep 0.2; done
    if alive "$name"; then
        say "$name ($pid) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$RUN/$name.started"
}

cmd_stop() {
    need_root stop
    [[ -d $RUN ]] || {
        say "nothing to stop in $STATE"
        return 0
    }
    local any=0
    for d in "${DAEMONS[@]}"; do alive "$d" && any=1; done
    ((any)) || say "no daemon started from $STATE is running"
    if alive slurmctld; then
        # Cancel this cluster's jobs first: their job step daemons (slurmstepd) outlive slurmd.
        SLURM_CONF=$CONF timeout 20 scancel --full --quiet --user=root 2>/dev/null || true
        SLURM_CONF=$CONF timeout 20 bash -c \
            'while [[ -n $(squeue -h -t R,CG,PD -o %i) ]]; do sleep 0.5; done' 2>/dev/null || true
    fi
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_pid "${DAEMONS[i]}"; done
    if [[ -L $SYSCONF && $(readlink "$SYSCONF") == "$CONF" ]]; then rm -f "$SYSCONF"; fi
    say "stopped"
}

cmd_status() {
    local d rc=0
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then
            echo "$d: running (pid $(<"$RUN/$d.started"))"
        elif [[ -f $RUN/$d.started ]]; then
            echo "$d: dead"
            rc=1
        fi
    done
    [[ -d $RUN ]] && ls "$RUN"/*.started >/dev/null 2>&1 || {
        echo "no cluster in $STATE"
        return 3
    }
    if alive slurmctld; then SLURM_CONF=$CONF sinfo -N -o "%N %T %c %m %G" || rc=1; fi
    return $rc
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    [[ ${1:-} == -h || ${1:-} == --help ]] || exit 2
    ;;
esac
