#!/usr/bin/env bash
# A real 4-node SLURM cluster on this one machine, for tests.
#
#   bash tests/cluster/slurm_cluster.sh start    # idempotent; installs Debian packages if missing
#   bash tests/cluster/slurm_cluster.sh status   # prints sinfo; exit 0 when up, 1 otherwise
#   bash tests/cluster/slurm_cluster.sh stop     # stops only the daemons it started (pid files)
#   bash tests/cluster/slurm_cluster.sh env      # prints the export lines for this cluster
#
# munged, slurmctld and four slurmd (node1..node4, `slurmd -N nodeK`) -- plus slurmdbd and a
# private MariaDB when accounting is on -- run as root daemons on loopback only, with every
# file under the state directory. Settings (environment):
#   PCE_SLURM_DIR            state directory (default /tmp/pce_slurm); kept by `stop`, so job
#                            ids keep growing and accounting history stays
#   PCE_SLURM_PORT_BASE      first TCP port (default 16817): slurmctld base, node K base+K,
#                            slurmdbd base+5, MariaDB base+6
#   PCE_SLURM_START_TIMEOUT  seconds to wait for the 4 nodes to be idle (default 90)
#   PCE_SLURM_ACCOUNTING     1 (default): slurmdbd on a private MariaDB, so `sacct` works --
#                            submitit reads job states only through sacct and, without it,
#                            never notices a job that slurm cancelled or killed.
#                            0: no accounting (lighter; `sacct` then fails).
#                            Switching needs `stop` then `start`.
# Clients find the cluster with SLURM_CONF=<state dir>/slurm.conf (also in <state dir>/env).
# The munge socket is private to the state dir and named in slurm.conf, so a system munged or
# slurm on the same machine is neither needed nor touched. Needs root (daemons, apt-get,
# /etc/hosts).
set -euo pipefail

STATE_DIR=${PCE_SLURM_DIR:-/tmp/pce_slurm}
PORT_BASE=${PCE_SLURM_PORT_BASE:-16817}
START_TIMEOUT=${PCE_SLURM_START_TIMEOUT:-90}
ACCOUNTING=${PCE_SLURM_ACCOUNTING:-1}
NODES=(node1 node2 node3 node4)
CLUSTER_NAME=pce
PACKAGES=(slurmctld slurmd slurm-client munge)
ACCOUNTING_PACKAGES=(slurmdbd mariadb-server-core mariadb-client-core)

[[ $STATE_DIR == /* ]] || STATE_DIR=$PWD/$STATE_DIR
STATE_DIR=${STATE_DIR%/}
CONF=$STATE_DIR/slurm.conf
LOG_DIR=$STATE_DIR/log
MUNGE_DIR=$STATE_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MUNGE_PID=$MUNGE_DIR/munged.pid
MUNGE_KEY=$MUNGE_DIR/munge.key
CTLD_PID=$STATE_DIR/run/slurmctld.pid
DBD_PID=$STATE_DIR/run/slurmdbd.pid
DB_DIR=$STATE_DIR/db
DB_PID=$STATE_DIR/run/mariadbd.pid
DB_SOCKET=$DB_DIR/mariadbd.sock
DBD_PORT=$((PORT_BASE + 5))
DB_PORT=$((PORT_BASE + 6))
SHORT_HOST=$(hostname -s)
HOSTS_BEGIN="# >>> pce_slurm test cluster $STATE_DIR (tests/cluster/slurm_cluster.sh) >>>"
HOSTS_END="# <<< pce_slurm test cluster $STATE_DIR <<<"
DAEMON_PATH=/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "[slurm_cluster] $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
slurmd_pid_file() { echo "$STATE_DIR/run/slurmd.$1.pid"; }

# slurm.conf takes no quoting, and slurmstepd's sockets <dir>/spool/nodeK/<host>_<job>.<step>
# must fit a unix socket path (107 bytes)
[[ $STATE_DIR =~ ^[A-Za-z0-9_./-]+$ ]] || die "PCE_SLURM_DIR '$STATE_DIR': use only letters, digits and _ . / -"
((${#STATE_DIR} + ${#SHORT_HOST} + 40 <= 107)) || die "PCE_SLURM_DIR '$STATE_DIR' is too long for unix socket paths"

# --- processes --------------------------------------------------------------------------------

# pid_alive PIDFILE NEEDLE: prints the pid when the pid file names a live process whose command
# line or environment contains NEEDLE (our config, socket or data path), so a recycled pid is
# never taken for ours. slurmdbd takes no config argument: it is recognised by the SLURM_CONF
# it was started with.
pid_alive() {
    local file=$1 needle=$2 pid
    [[ -s $file && -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    if [[ -r /proc/$pid/environ ]]; then
        { cat "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null || true; } |
            tr '\0' '\n' | grep -qF -- "$needle" || return 1
    else
        # not root (only `status` runs so): the process name has to do
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "${3:-}" ]] || return 1
    fi
    echo "$pid"
}

munged_pid() { pid_alive "$MUNGE_PID" "$MUNGE_SOCKET" munged; }
db_pid() { pid_alive "$DB_PID" "$DB_DIR" mariadbd; }
dbd_pid() { pid_alive "$DBD_PID" "SLURM_CONF=$CONF" slurmdbd; }
ctld_pid() { pid_alive "$CTLD_PID" "$CONF" slurmctld; }
slurmd_pid() { pid_alive "$(slurmd_pid_file "$1")" "$CONF" slurmd; }

any_daemon_running() {
    local n
    munged_pid >/dev/null && return 0
    db_pid >/dev/null && return 0
    dbd_pid >/dev/null && return 0
    ctld_pid >/dev/null && return 0
    for n in "${NODES[@]}"; do slurmd_pid "$n" >/dev/null && return 0; done
    return 1
}

all_daemons_running() {
    local n
    munged_pid >/dev/null || return 1
    if [[ $ACCOUNTING == 1 ]]; then
        db_pid >/dev/null || return 1
        dbd_pid >/dev/null || return 1
    fi
    ctld_pid >/dev/null || return 1
    for n in "${NODES[@]}"; do slurmd_pid "$n" >/dev/null || return 1; done
    return 0
}

# client_env CMD...: run a slurm client against this cluster (and not a job's own allocation)
client_env() {
    env -u SLURM_JOB_ID -u SLURM_JOBID SLURM_CONF="$CONF" "$@"
}

# daemon_env CMD...: start a self-daemonizing daemon detached (own session, no inherited fds
# or environment); returns its launcher's exit status
daemon_env() {
    setsid env -i PATH=$DAEMON_PATH SLURM_CONF="$CONF" "$@" </dev/null >>"$LOG_DIR/daemons.out" 2>&1 9>&-
}

# daemon_fork CMD...: the same for a daemon that stays in the foreground (setsid -f forks it
# off; a `&` job would keep a subshell of this script, and its fds, around)
daemon_fork() {
    setsid -f env -i PATH=$DAEMON_PATH SLURM_CONF="$CONF" "$@" </dev/null >>"$LOG_DIR/daemons.out" 2>&1 9>&-
}

tail_logs() {
    local f
    for f in "$LOG_DIR"/munged.log "$LOG_DIR"/mariadbd.log "$LOG_DIR"/slurmdbd.log \
        "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.*.log "$LOG_DIR"/daemons.out; do
        [[ -s $f ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

check_ports() {
    local port busy=""
    command -v ss >/dev/null || return 0
    for port in "$@"; do
        busy+=$(ss -Htlnp "sport = :$port" 2>/dev/null | sed -n "s/.*users:((\(.*\)))/ $port:\1/p")
    done
    [[ -z $busy ]] || die "port(s) in use, not by a daemon of $STATE_DIR:$busy (another cluster? set PCE_SLURM_PORT_BASE)"
}

wait_for() {
    # wait_for SECONDS WHAT CMD...: polls CMD every 0.25 s until it succeeds
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${limit} s waiting for $what"
            return 1
        fi
        sleep 0.25
    done
}

# --- install ----------------------------------------------------------------------------------

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]} (Debian packages)"
    local t0=$SECONDS policy=/usr/sbin/policy-rc.d backup=""
    # Package scripts try to start their services, which fails without systemd/init: a
    # policy-rc.d answering 101 ("action forbidden") is in place during the install only; a
    # policy-rc.d that was there before is put back as it was.
    if [[ -e $policy ]]; then
        backup=$(mktemp /usr/sbin/.policy-rc.d.pce_backup.XXXXXX)
        cp -a "$policy" "$backup"
    fi
    # shellcheck disable=SC2064
    trap "restore_policy '$backup'" EXIT
    printf '#!/bin/sh\n# temporary, from tests/cluster/slurm_cluster.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    local apt_env=(env DEBIAN_FRONTEND=noninteractive)
    local apt_opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    local cand
    cand=$(apt-cache policy slurmd 2>/dev/null | sed -n 's/ *Candidate: *//p')
    if [[ -z $cand || $cand == "(none)" ]]; then
        "${apt_env[@]}" apt-get update -q >&2
    fi
    if ! "${apt_env[@]}" apt-get install "${apt_opts[@]}" "${missing[@]}" >&2; then
        log "install failed; running apt-get update and trying once more"
        "${apt_env[@]}" apt-get update -q >&2
        "${apt_env[@]}" apt-get install "${apt_opts[@]}" "${missing[@]}" >&2
    fi
    restore_policy "$backup"
    trap - EXIT
    log "installed in $((SECONDS - t0)) s"
}

restore_policy() {
    local backup=$1 policy=/usr/sbin/policy-rc.d
    if [[ -n $backup ]]; then
        [[ -e $backup ]] && mv -f "$backup" "$policy"
    else
        rm -f "$policy"
    fi
}

# --- /etc/hosts -------------------------------------------------------------------------------
# Slurm itself reaches the nodes by NodeAddr=127.0.0.1; the names are for job code that
# resolves the hostnames in SLURM_JOB_NODELIST (e.g. torch.distributed's MASTER_ADDR=node1).

hosts_block_present() { grep -qxF "$HOSTS_BEGIN" /etc/hosts 2>/dev/null; }

remove_hosts_block() {
    hosts_block_present || return 0
    local tmp
    tmp=$(mktemp)
    awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0==b{skip=1;next} $0==e{skip=0;next} !skip' /etc/hosts >"$tmp"
    # rewrite in place: /etc/hosts may be a bind mount that cannot be replaced by a rename
    cat "$tmp" >/etc/hosts
    rm -f "$tmp"
}

add_hosts_block() {
    remove_hosts_block
    local extra=""
    # srun and the daemons resolve this host's short name too; map it only when nothing does
    getent hosts "$SHORT_HOST" >/dev/null || extra=" $SHORT_HOST"
    {
        echo "$HOSTS_BEGIN"
        echo "127.0.0.1 ${NODES[*]}$extra"
        echo "$HOSTS_END"
    } >>/etc/hosts
}

# --- configuration ----------------------------------------------------------------------------

first_job_id() {
    # A fresh controller state would restart job ids at 1 and collide with job folders left by
    # an earlier cluster (submitit names its files after job ids). Derive the first id from the
    # clock once per state dir; the saved controller state keeps the sequence afterwards.
    local f=$STATE_DIR/first_job_id
    if [[ ! -s $f ]]; then
        # seconds since 2024-01-01 / 4 + 1000: grows with time, far below MaxJobId (67043328)
        echo $(((($(date +%s) - 1704067200) / 4) % 60000000 + 1000)) >"$f"
    fi
    cat "$f"
}

write_config() {
    local i tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Generated by tests/cluster/slurm_cluster.sh -- edits are overwritten on the next start.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$SHORT_HOST(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$STATE_DIR/run/slurmd.%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
FirstJobId=$(first_job_id)
# no cgroups here: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# node sizes come from this file, not from the machine: 4 nodes share 2 cores
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# start batch jobs on submission instead of up to 3 s later (default batch_sched_delay=3)
SchedulerParameters=batch_sched_delay=0
PreemptType=preempt/none
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
KillWait=5
InactiveLimit=0
MinJobAge=300
Waittime=0
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
EOF
    if [[ $ACCOUNTING == 1 ]]; then
        cat >>"$tmp" <<EOF
# accounting through slurmdbd (own MariaDB) so that sacct works; AccountingStoragePass names
# the munge socket for the slurmdbd connection (AuthInfo does not apply to that one)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
EOF
    else
        echo "AccountingStorageType=accounting_storage/none" >>"$tmp"
    fi
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeHostname=$SHORT_HOST NodeAddr=127.0.0.1 Port=$((PORT_BASE + i + 1)) CPUs=2 RealMemory=4000 State=UNKNOWN" >>"$tmp"
    done
    echo "PartitionName=debug Nodes=node[1-${#NODES[@]}] Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP" >>"$tmp"
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
    else
        if [[ -f $CONF ]] && any_daemon_running; then
            log "WARNING: $CONF changed while daemons run; 'stop' then 'start' to apply it everywhere"
        fi
        mv -f "$tmp" "$CONF"
        chmod 644 "$CONF"
    fi
    print_env | sed '1i # source this file to talk to the test cluster of tests/cluster/slurm_cluster.sh' >"$STATE_DIR/env"
}

print_env() {
    echo "export SLURM_CONF=$CONF"
    echo "export PCE_SLURM_DIR=$STATE_DIR"
}

# --- readiness --------------------------------------------------------------------------------

# nodes_ready: sinfo lists all our nodes responding and usable (idle/mixed/allocated/completing
# with no '*' not-responding, drain or down mark)
nodes_ready() {
    local out ready
    out=$(client_env timeout 10 sinfo -h -N -p debug -o '%N %T' 2>/dev/null) || return 1
    ready=$(awk '$2 ~ /^(idle|mixed|allocated|completing)$/ {print $1}' <<<"$out" | sort -u | wc -l)
    [[ $ready -eq ${#NODES[@]} ]]
}

ctld_up() { client_env timeout 10 scontrol ping 2>/dev/null | grep -q "is UP"; }
dbd_up() { client_env timeout 10 sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
cluster_registered() {
    client_env timeout 10 sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"
}
db_sql() { mariadb --no-defaults -S "$DB_SOCKET" -u root "$@"; }
db_up() { db_sql -e 'SELECT 1' >/dev/null 2>&1; }

# --- start ------------------------------------------------------------------------------------

start_munged() {
    munged_pid >/dev/null && return 0
    rm -f "$MUNGE_PID" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    mkdir -p "$MUNGE_DIR"
    [[ -s $MUNGE_KEY ]] || dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    # munged runs as the munge user (the package creates it) and wants its key owned by that
    # user and private; clients only need to traverse the socket dir (0711)
    chown -R munge:munge "$MUNGE_DIR"
    chmod 0711 "$MUNGE_DIR"
    chmod 0400 "$MUNGE_KEY"
    touch "$LOG_DIR/munged.log"
    chown munge:munge "$LOG_DIR/munged.log"
    setsid env -i PATH=$DAEMON_PATH runuser -u munge -- /usr/sbin/munged \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" --pid-file="$MUNGE_PID" \
        --log-file="$LOG_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        </dev/null >>"$LOG_DIR/daemons.out" 2>&1 9>&- || {
        tail_logs
        die "munged failed to start"
    }
    wait_for 15 "munged" munged_pid >/dev/null || {
        tail_logs
        die "munged did not come up"
    }
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null || {
        tail_logs
        die "munge credential round trip failed"
    }
}

start_db() {
    db_pid >/dev/null && return 0
    rm -f "$DB_PID" "$DB_SOCKET"
    mkdir -p "$DB_DIR"
    chmod 700 "$DB_DIR"
    check_ports "$DB_PORT"
    # a small private server: loopback only, no name lookups; buffer pool and lock wait at
    # the values slurmdbd asks for
    local opts=(--no-defaults --user=root --datadir="$DB_DIR/data" --socket="$DB_SOCKET"
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --skip-log-bin
        --performance-schema=OFF --innodb-buffer-pool-size=128M --innodb-log-file-size=16M
        --innodb-lock-wait-timeout=900 --max-connections=50)
    if [[ ! -d $DB_DIR/data/mysql ]]; then
        rm -rf "$DB_DIR/data"
        mariadb-install-db "${opts[@]}" --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG_DIR/mariadb-install-db.log" 2>&1 9>&- || {
            tail -n 30 "$LOG_DIR/mariadb-install-db.log" >&2
            die "mariadb-install-db failed"
        }
    fi
    daemon_fork /usr/sbin/mariadbd "${opts[@]}" --pid-file="$DB_PID" --log-error="$LOG_DIR/mariadbd.log"
    wait_for 60 "MariaDB" db_up || {
        tail_logs
        die "MariaDB did not come up"
    }
    wait_for 10 "MariaDB pid file" db_pid >/dev/null || {
        tail_logs
        die "MariaDB wrote no pid file"
    }
    chmod 644 "$DB_PID" # for a non-root `status`
    local pass_file=$DB_DIR/slurm.pass
    [[ -s $pass_file ]] || (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$pass_file")
    db_sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$pass_file")';
               GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || {
        tail_logs
        die "could not create the slurm database user"
    }
}

write_dbd_config() {
    (
        umask 077
        cat >"$STATE_DIR/slurmdbd.conf" <<EOF
# Generated by tests/cluster/slurm_cluster.sh -- edits are overwritten on the next start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$SHORT_HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DBD_PID
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$DB_DIR/slurm.pass")
StorageLoc=slurm_acct_db
EOF
    )
}

start_slurmdbd() {
    dbd_pid >/dev/null && return 0
    rm -f "$DBD_PID"
    check_ports "$DBD_PORT"
    write_dbd_config
    # slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF
    daemon_env /usr/sbin/slurmdbd || {
        tail_logs
        die "slurmdbd failed to start"
    }
    wait_for 60 "slurmdbd to answer sacctmgr" dbd_up || {
        tail_logs
        die "slurmdbd did not come up"
    }
}

start_slurmctld() {
    ctld_pid >/dev/null && return 0
    rm -f "$CTLD_PID"
    check_ports "$PORT_BASE"
    daemon_env /usr/sbin/slurmctld -f "$CONF" || {
        tail_logs
        die "slurmctld failed to start"
    }
    wait_for 30 "slurmctld to answer 'scontrol ping'" ctld_up || {
        tail_logs
        die "slurmctld did not come up"
    }
}

start_slurmd() {
    local node=$1 port=$2
    slurmd_pid "$node" >/dev/null && return 0
    rm -f "$(slurmd_pid_file "$node")"
    mkdir -p "$STATE_DIR/spool/$node"
    check_ports "$port"
    daemon_env /usr/sbin/slurmd -f "$CONF" -N "$node" || {
        tail_logs
        die "slurmd $node failed to start"
    }
}

# preflight_ports: before starting anything, the ports of the daemons still to start are free
preflight_ports() {
    local ports=() i
    if [[ $ACCOUNTING == 1 ]]; then
        db_pid >/dev/null || ports+=("$DB_PORT")
        dbd_pid >/dev/null || ports+=("$DBD_PORT")
    fi
    ctld_pid >/dev/null || ports+=("$PORT_BASE")
    for i in "${!NODES[@]}"; do
        slurmd_pid "${NODES[$i]}" >/dev/null || ports+=($((PORT_BASE + i + 1)))
    done
    [[ ${#ports[@]} -eq 0 ]] || check_ports "${ports[@]}"
}

cluster_up() { [[ -f $CONF ]] && all_daemons_running && hosts_block_present && nodes_ready; }

cmd_start() {
    local t0 i
    t0=$(date +%s.%N)
    if cluster_up; then
        log "already running (state dir $STATE_DIR)"
        print_env
        return 0
    fi
    install_packages
    preflight_ports
    mkdir -p "$STATE_DIR"/{run,log,ctld,spool}
    chmod 755 "$STATE_DIR"
    write_config
    add_hosts_block
    start_munged
    if [[ $ACCOUNTING == 1 ]]; then
        start_db
        start_slurmdbd
    fi
    start_slurmctld
    for i in "${!NODES[@]}"; do
        start_slurmd "${NODES[$i]}" $((PORT_BASE + i + 1))
    done
    if ! wait_for "$START_TIMEOUT" "${#NODES[@]} nodes idle in sinfo" nodes_ready; then
        client_env sinfo -N -o '%N %T %E' >&2 || true
        # a node left down/drained by an earlier crash may not come back by itself: resume once
        if client_env sinfo -h -N -o '%T' 2>/dev/null | grep -qE 'down|drain|fail'; then
            log "resuming down/drained nodes and waiting once more"
            client_env scontrol update NodeName="node[1-${#NODES[@]}]" State=RESUME || true
            wait_for 30 "nodes after resume" nodes_ready || {
                tail_logs
                die "cluster did not become ready"
            }
        else
            tail_logs
            die "cluster did not become ready within ${START_TIMEOUT} s"
        fi
    fi
    if [[ $ACCOUNTING == 1 ]]; then
        # slurmctld adds its cluster to the accounting database when it first connects
        wait_for 30 "the cluster to be registered with slurmdbd" cluster_registered || {
            tail_logs
            die "cluster not registered in accounting"
        }
    fi
    client_env sinfo -N >&2
    log "cluster up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s (state dir $STATE_DIR)"
    print_env
}

# --- stop -------------------------------------------------------------------------------------

# stop_pid PID NAME: SIGTERM, wait up to 20 s, then SIGKILL
stop_pid() {
    local pid=$1 name=$2 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 80; i++)); do
        [[ -d /proc/$pid ]] || return 0
        [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && return 0
        sleep 0.25
    done
    log "$name (pid $pid) still there 20 s after SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
}

# stepd_pids: slurmstepd processes of this cluster, found by their sockets in our spool dirs
stepd_pids() {
    local inodes p fd target
    inodes=$(awk -v d="$STATE_DIR/spool/" 'index($8, d)==1 {print $7}' /proc/net/unix 2>/dev/null | sort -u)
    [[ -n $inodes ]] || return 0
    for p in /proc/[0-9]*; do
        for fd in "$p"/fd/*; do
            target=$(readlink "$fd" 2>/dev/null) || continue
            [[ $target == socket:\[* ]] || continue
            target=${target#socket:[}
            target=${target%]}
            if grep -qxF "$target" <<<"$inodes"; then
                echo "${p#/proc/}"
                break
            fi
        done
    done
}

# with_descendants PID...: the pids given and all their descendants
with_descendants() {
    ps -e -o pid= -o ppid= | awk -v roots="$*" '
        { parent[$1] = $2 }
        END {
            n = split(roots, queue, " ")
            for (i = 1; i <= n; i++) seen[queue[i]] = 1
            for (i = 1; i <= n; i++)
                for (p in parent)
                    if (parent[p] == queue[i] && !(p in seen)) { seen[p] = 1; queue[++n] = p }
            for (p in seen) print p
        }'
}

no_jobs_left() { [[ -z $(client_env timeout 10 squeue -h -o %i 2>/dev/null) ]]; }

cmd_stop() {
    local pid n strays
    if ctld_pid >/dev/null && ! no_jobs_left; then
        # cancel what is left so that no job step outlives its slurmd
        log "cancelling remaining jobs"
        client_env timeout 10 scancel --quiet --partition=debug 2>/dev/null || true
        wait_for 20 "jobs to end" no_jobs_left || client_env squeue >&2 || true
    fi
    if pid=$(ctld_pid); then
        log "stopping slurmctld (pid $pid)"
        stop_pid "$pid" slurmctld
    fi
    for n in "${NODES[@]}"; do
        if pid=$(slurmd_pid "$n"); then
            log "stopping slurmd $n (pid $pid)"
            stop_pid "$pid" "slurmd $n"
        fi
    done
    strays=$(stepd_pids | tr '\n' ' ')
    if [[ -n ${strays// /} ]]; then
        # job steps whose slurmd died before they could be cancelled: kill them and what they run
        # shellcheck disable=SC2086
        strays=$(with_descendants $strays | tr '\n' ' ')
        log "killing leftover job steps and their processes: $strays"
        # shellcheck disable=SC2086
        kill -KILL $strays 2>/dev/null || true
    fi
    if pid=$(dbd_pid); then
        log "stopping slurmdbd (pid $pid)"
        stop_pid "$pid" slurmdbd
    fi
    if pid=$(db_pid); then
        log "stopping mariadbd (pid $pid)"
        stop_pid "$pid" mariadbd
    fi
    if pid=$(munged_pid); then
        log "stopping munged (pid $pid)"
        stop_pid "$pid" munged
    fi
    rm -f "$CTLD_PID" "$DBD_PID" "$DB_PID" "$MUNGE_PID" "$STATE_DIR"/run/slurmd.*.pid
    remove_hosts_block
    log "stopped (state kept in $STATE_DIR)"
}

# --- status -----------------------------------------------------------------------------------

cmd_status() {
    local n pid rc=0
    show() { # show NAME PIDFUNC [ARG]
        local name=$1
        shift
        if pid=$("$@"); then
            printf '%-16s running (pid %s)\n' "$name" "$pid"
        else
            printf '%-16s not running\n' "$name"
            rc=1
        fi
    }
    show munged munged_pid
    if [[ $ACCOUNTING == 1 ]]; then
        show mariadbd db_pid
        show slurmdbd dbd_pid
    fi
    show slurmctld ctld_pid
    for n in "${NODES[@]}"; do show "slurmd $n" slurmd_pid "$n"; done
    if [[ $rc -eq 0 ]]; then
        client_env timeout 10 sinfo -N || rc=1
        nodes_ready || {
            echo "not all ${#NODES[@]} nodes are ready"
            rc=1
        }
    fi
    if [[ $rc -eq 0 ]]; then print_env; fi
    return $rc
}

# resolve_accounting: a running cluster keeps the accounting mode it was started with
resolve_accounting() {
    [[ $ACCOUNTING == 0 || $ACCOUNTING == 1 ]] || die "PCE_SLURM_ACCOUNTING must be 0 or 1"
    if [[ -f $CONF ]] && any_daemon_running; then
        local running=0
        grep -q '^AccountingStorageType=accounting_storage/slurmdbd' "$CONF" && running=1
        if [[ -n ${PCE_SLURM_ACCOUNTING:-} && $PCE_SLURM_ACCOUNTING != "$running" && ${1:-} == start ]]; then
            die "the cluster in $STATE_DIR runs with PCE_SLURM_ACCOUNTING=$running; 'stop' it first to switch"
        fi
        ACCOUNTING=$running
    fi
    if [[ $ACCOUNTING == 1 ]]; then PACKAGES+=("${ACCOUNTING_PACKAGES[@]}"); fi
}

main() {
    local cmd=${1:-}
    resolve_accounting "$cmd"
    case $cmd in
    start | stop)
        if [[ $cmd == start ]] && cluster_up; then
            # the common case, answered without waiting for a start/stop in progress
            log "already running (state dir $STATE_DIR)"
            print_env
            return 0
        fi
        [[ $(id -u) -eq 0 ]] || die "$cmd must run as root"
        mkdir -p "$STATE_DIR"
        # one start/stop at a time per state dir (a CI script and a test session may race);
        # the daemons are started with fd 9 closed so that they do not hold the lock
        exec 9>"$STATE_DIR/.lock"
        flock -w 300 9 || die "another start/stop holds $STATE_DIR/.lock"
        "cmd_$cmd"
        ;;
    status) cmd_status ;;
    env) print_env ;;
    *)
        echo "usage: $0 start|stop|status|env" >&2
        exit 2
        ;;
    esac
}

main "$@"
