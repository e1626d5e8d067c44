#!/usr/bin/env bash
# A real single-node SLURM for the slow tests (Debian's slurm-wlm + munge), started idempotently.
#
#   scripts/slurm_up.sh            install (apt-get, when missing and run as root), configure, start; then check
#   scripts/slurm_up.sh --check    exit 0 when sinfo shows the node idle/mixed/allocated, else non-zero
#
# Containers have no cgroup/systemd for SLURM, so processes are tracked through /proc (proctrack/linuxproc) and no
# task plugin binds them (task/none). The node declares this machine's real CPU count and memory. Accounting goes
# nowhere (accounting_storage/none): the launcher reads job states from squeue, then from the exit-code file its
# sbatch script writes, so it does not need sacct; finished jobs stay visible in squeue for MinJobAge seconds.
set -euo pipefail

conf_dir=/etc/slurm
state_dir=/var/spool/slurmctld
spool_dir=/var/spool/slurmd
log_dir=/var/log/slurm
run_dir=/run/slurm

check() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state=$(timeout 10 sinfo -h -N -o '%t' 2>/dev/null | head -n1) || return 1
    case "$state" in idle* | mix* | alloc* | comp*) return 0 ;; *) return 1 ;; esac
}

if [[ "${1:-}" == "--check" ]]; then
    check
    exit $?
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "slurm_up: slurm-wlm/munge are not installed and this is not root (apt-get needs root)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
if [[ $(id -u) -ne 0 ]]; then
    check && exit 0
    echo "slurm_up: SLURM is installed but not running, and starting its daemons needs root" >&2
    exit 1
fi

host=$(hostname -s)
cpus=$(nproc --all)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "$conf_dir" "$state_dir" "$spool_dir" "$log_dir" "$run_dir" /etc/munge /var/lib/munge /var/log/munge /run/munge

# --- munge: one key, daemon running
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --force
    else
        /usr/sbin/munged --force
    fi
    for _ in $(seq 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi

# --- slurm.conf (rewritten only when it changes, so a running cluster is left alone)
conf=$(cat <<CONF
# written by scripts/slurm_up.sh
ClusterName=ci
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=cred_expire=30  # also how long a requeued job waits before it may start again (default 120 s)
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state_dir
SlurmdSpoolDir=$spool_dir
SlurmctldPidFile=$run_dir/slurmctld.pid
SlurmdPidFile=$run_dir/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
LaunchParameters=use_interactive_step
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=3600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)
changed=0
if [[ ! -f $conf_dir/slurm.conf ]] || [[ "$(cat $conf_dir/slurm.conf)" != "$conf" ]]; then
    printf '%s\n' "$conf" >"$conf_dir/slurm.conf"
    changed=1
fi
rm -f "$conf_dir/cgroup.conf"  # no cgroup plugin at all (proctrack/linuxproc, task/none)

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [[ $changed -eq 1 ]]; then  # restart daemons started with an older config
    for pidfile in "$run_dir/slurmd.pid" "$run_dir/slurmctld.pid"; do
        if running "$pidfile"; then kill "$(cat "$pidfile")"; sleep 1; fi
    done
fi
running "$run_dir/slurmctld.pid" || /usr/sbin/slurmctld
running "$run_dir/slurmd.pid" || /usr/sbin/slurmd

for _ in $(seq 30); do
    if check; then
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        sinfo
        exit 0
    fi
    state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n1 || true)
    if [[ "$state" == down* || "$state" == drain* ]]; then
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    fi
    sleep 1
done
echo "slurm_up: the node did not come up; see $log_dir/slurmctld.log and $log_dir/slurmd.log" >&2
sinfo >&2 || true
exit 1
