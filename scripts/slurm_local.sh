#!/usr/bin/env bash
# A real single-node SLURM on this machine (Debian slurm-wlm + munge, with slurmdbd + MariaDB so `sacct` works and
# submitit sees killed jobs instead of waiting forever). Needs root; no systemd, no cgroups.
#   scripts/slurm_local.sh start   # install what is missing (apt-get), start the daemons, wait for an idle node
#   scripts/slurm_local.sh stop    # cancel jobs, stop the daemons
#   scripts/slurm_local.sh status
# Exit 3: apt-get could not install the packages (no network): callers may skip.
set -euo pipefail

W=${SLURM_LOCAL_DIR:-/var/lib/scaling-slurm}
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

log() { echo "[slurm_local] $*" >&2; }

install() {
  local missing=()
  for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || { log "must run as root to install ${missing[*]}"; exit 3; }
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
    log "apt-get could not install ${missing[*]} (no network?)"; exit 3
  fi
}

idle() { [ "$(sinfo -h -o %T 2>/dev/null | head -1)" = "idle" ] || [ "$(sinfo -h -o %T 2>/dev/null | head -1)" = "mixed" ]; }

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local n=$1 what=$2; shift 2
  for _ in $(seq $((n * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out waiting for $what"; return 1
}

start() {
  if idle && running "$W/slurmctld.pid"; then log "already up"; sinfo; return 0; fi
  install
  local H; H=$(hostname)
  mkdir -p "$W/state" "$W/spool" "$W/log" /etc/slurm /var/run/munge /var/run/mysqld
  chown munge:munge /var/run/munge && chown mysql:mysql /var/run/mysqld

  [ -f /etc/munge/munge.key ] || /usr/sbin/mungekey --create
  running /var/run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
  wait_for 10 munge sh -c 'munge -n | unmunge'

  # Accounting database: `sacct` needs it, and submitit polls sacct to notice jobs that died without a result.
  if ! mysqladmin --socket=/var/run/mysqld/mysqld.sock ping >/dev/null 2>&1; then
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
    /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/var/run/mysqld/mysqld.sock \
      --pid-file=/var/run/mysqld/mysqld.pid --log-error=/var/run/mysqld/error.log >/dev/null 2>&1 &
    wait_for 30 mariadb mysqladmin --socket=/var/run/mysqld/mysqld.sock ping
  fi
  mysql --socket=/var/run/mysqld/mysqld.sock -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  umask 077
  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$W/log/slurmdbd.log
PidFile=$W/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  umask 022
  running "$W/slurmdbd.pid" || /usr/sbin/slurmdbd
  sleep 1

  # The node line from `slurmd -C`, so CPUs and RealMemory fit this machine (too much memory drains the node).
  local node; node=$(/usr/sbin/slurmd -C | head -1)
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=local
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/log/slurmctld.log
SlurmdLogFile=$W/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
KillWait=5
MpiDefault=none
$node State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
EOF
  running "$W/slurmctld.pid" || /usr/sbin/slurmctld
  running "$W/slurmd.pid" || /usr/sbin/slurmd
  wait_for 60 "an idle node" idle
  sinfo
}

stop() {
  scancel --user=root 2>/dev/null || true
  wait_for 30 "an empty queue" sh -c '[ -z "$(squeue -h 2>/dev/null)" ]' || true
  for f in "$W/slurmd.pid" "$W/slurmctld.pid" "$W/slurmdbd.pid" /var/run/mysqld/mysqld.pid /var/run/munge/munged.pid; do
    if running "$f"; then kill "$(cat "$f")"; fi
  done
  log "stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
