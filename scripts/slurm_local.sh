#!/usr/bin/env bash
# A real single-node SLURM on this machine (Debian slurm-wlm + munge, with slurmdbd + MariaDB so `sacct` works and
# submitit sees killed jobs instead of waiting forever). Needs root; no systemd, no cgroups.
#   scripts/slurm_local.sh start [--force]   # install what is missing (apt-get), start the daemons, wait for idle
#   scripts/slurm_local.sh stop              # cancel the jobs of its partition, stop the daemons it started
#   scripts/slurm_local.sh status
# What it changes on the system: installs the packages in PKGS; writes /etc/slurm/slurm.conf and
# /etc/slurm/slurmdbd.conf (each marked by its first line, MARK below; a file it replaces is first copied to
# <file>.bak-<timestamp>, and a file without the mark is never replaced unless --force); creates the munge key if
# there is none; creates the MariaDB user 'slurm'@'localhost' (database slurm_acct_db) with a random password kept
# only in slurmdbd.conf (mode 600); keeps its state, logs and pid files in $SLURM_LOCAL_DIR (/var/lib/scaling-slurm).
# Exit 3: apt-get could not install the packages (no network): callers may skip. Exit 4: refused (not its config).
set -euo pipefail

W=${SLURM_LOCAL_DIR:-/var/lib/scaling-slurm}
ETC=${SLURM_LOCAL_ETC:-/etc/slurm}  # where SLURM reads its config; another folder only for tests of the refusals
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
PARTITION=debug  # the partition configs/hydra/launcher/slurm_local.yaml submits to; `stop` cancels only its jobs
MARK="# written by scaling scripts/slurm_local.sh (remove this line to keep the script from replacing the file)"
FORCE=0

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

idle() { case "$(sinfo -h -o %T 2>/dev/null | head -1)" in idle|mixed) return 0 ;; *) return 1 ;; esac; }
busy() { case "$(sinfo -h -o %T 2>/dev/null | head -1)" in allocated|completing) return 0 ;; *) return 1 ;; esac; }

running() {  # running PIDFILE NAME: its process is alive and is NAME (an exited daemon not yet reaped does not count)
  # The name matters: daemons killed without a clean exit leave their pid files behind, and after a reboot (or in a
  # restored machine image) that pid can belong to any process; trusting it left slurmdbd unstarted and sacct down.
  local pid; pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && ! ps -o stat= -p "$pid" | grep -q '^Z'
}
slurm_up() { running "$W/$1.pid" "$1"; }  # slurm_up slurmctld|slurmd|slurmdbd: the pid files live in $W

daemon_logs() {  # the state of each daemon and its log's last lines: what a timeout needs to be understood
  local d
  for d in slurmdbd slurmctld slurmd; do
    slurm_up "$d" && log "$d: running" || log "$d: not running"
    [ -f "$W/log/$d.log" ] && tail -n 5 "$W/log/$d.log" | sed "s/^/[slurm_local]   $d.log: /" >&2
  done
  db_up && log "mariadbd: answering" || log "mariadbd: not answering"
  [ -f /var/run/mysqld/error.log ] && tail -n 5 /var/run/mysqld/error.log | sed 's/^/[slurm_local]   mariadb: /' >&2
  return 0
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local n=$1 what=$2; shift 2
  for _ in $(seq $((n * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out waiting for $what"; return 1
}

ours() {  # ours FILE: written by this script (its mark; or, before the mark existed, its state paths under $W)
  [ "$(head -1 "$1" 2>/dev/null)" = "$MARK" ] || grep -qxE "(StateSaveLocation=$W/state|PidFile=$W/slurmdbd.pid)" "$1"
}

check_writable() {  # check_writable FILE: refuse (exit 4) to replace a configuration this script did not write
  local f=$1
  if [ -e "$f" ] && ! ours "$f" && [ "$FORCE" -ne 1 ]; then
    log "refusing to replace $f: this script did not write it (its first line is not '${MARK%% (*}'), so it" \
        "belongs to another SLURM setup; keep it, or rerun '$0 start --force' to replace it (the old file is kept" \
        "as $f.bak-<timestamp>)"
    exit 4
  fi
}

write_conf() {  # write_conf FILE MODE < content: back up what it replaces, then write atomically
  local f=$1 mode=$2 tmp
  tmp=$(mktemp "$f.new-XXXXXX")
  { echo "$MARK"; cat; } > "$tmp"
  chmod "$mode" "$tmp"
  if [ -e "$f" ] && ! cmp -s "$f" "$tmp"; then
    local bak; bak="$f.bak-$(date +%Y%m%d-%H%M%S)"
    [ ! -e "$bak" ] || bak="$bak-$$"
    cp -p "$f" "$bak"
    log "replacing $f (previous version kept as $bak)"
  fi
  mv -f "$tmp" "$f"
}

started_by_us() {  # started_by_us NAME PIDFILE: the process in PIDFILE is the NAME this script started (its pid
  # recorded at start), not one started since by the system (after a reboot, a distribution's own mariadb or munge)
  grep -qx "$1 $(cat "$2" 2>/dev/null)" "$W/started" 2>/dev/null
}
db_up() { mysqladmin --socket=/var/run/mysqld/mysqld.sock ping >/dev/null 2>&1; }

start() {
  # "Up" includes the accounting database: with slurmctld idle but MariaDB gone, sacct fails and submitit cannot see
  # jobs that die, so that case goes on to the (idempotent) start below, which restarts only what is down.
  # (sinfo last: with slurmctld down it retries its connection for ~30 s)
  if slurm_up slurmctld && slurm_up slurmdbd && db_up && { idle || busy; }; then
    log "already up"; sinfo; return 0
  fi
  check_writable "$ETC/slurm.conf"
  check_writable "$ETC/slurmdbd.conf"
  install
  local H; H=$(hostname)
  mkdir -p "$W/state" "$W/spool" "$W/log" "$ETC" /var/run/munge /var/run/mysqld
  chown munge:munge /var/run/munge && chown mysql:mysql /var/run/mysqld
  touch "$W/started"

  [ -f /etc/munge/munge.key ] || /usr/sbin/mungekey --create
  local new_munged=0
  running /var/run/munge/munged.pid munged || { runuser -u munge -- /usr/sbin/munged; new_munged=1; }
  wait_for 10 munge sh -c 'munge -n | unmunge'
  [ "$new_munged" -eq 0 ] || echo "munged $(cat /var/run/munge/munged.pid)" >> "$W/started"

  # Accounting database: `sacct` needs it, and submitit polls sacct to notice jobs that died without a result.
  if ! db_up; then
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
    # In a session of its own: mariadbd does not daemonize, and a caller that kills its process group when it ends
    # (a CI job runner, a test harness) would otherwise take the database down with it, while slurmctld, slurmd,
    # slurmdbd and munged (which detach themselves) stay up and sacct fails.
    setsid -f /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/var/run/mysqld/mysqld.sock \
      --pid-file=/var/run/mysqld/mysqld.pid --log-error=/var/run/mysqld/error.log >/dev/null 2>&1
    wait_for 30 mariadb db_up
    echo "mariadbd $(cat /var/run/mysqld/mysqld.pid)" >> "$W/started"
  fi
  # The database password: the one in its own slurmdbd.conf, else a new random one (never a fixed string).
  local pw="" new_pw=0
  if [ "$(head -1 "$ETC/slurmdbd.conf" 2>/dev/null)" = "$MARK" ]; then
    pw=$(sed -n 's/^StoragePass=//p' "$ETC/slurmdbd.conf")
  fi
  [ -n "$pw" ] || { pw=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n'); new_pw=1; }
  # On stdin, not the command line, so the password never shows in `ps`.
  mysql --socket=/var/run/mysqld/mysqld.sock <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'localhost';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
  write_conf "$ETC/slurmdbd.conf" 600 <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$W/log/slurmdbd.log
PidFile=$W/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$pw
StorageLoc=slurm_acct_db
EOF
  if slurm_up slurmdbd && [ "$new_pw" -eq 1 ]; then  # it holds the old password: restart it on the new one
    local old; old=$(cat "$W/slurmdbd.pid")
    kill "$old"; wait_for 10 "slurmdbd to exit" sh -c "! kill -0 $old" || true
  fi
  slurm_up slurmdbd || /usr/sbin/slurmdbd
  sleep 1

  # The node line from `slurmd -C`, so CPUs and RealMemory fit this machine (too much memory drains the node).
  local node; node=$(/usr/sbin/slurmd -C | head -1)
  write_conf "$ETC/slurm.conf" 644 <<EOF
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
PartitionName=$PARTITION Nodes=$H Default=YES MaxTime=INFINITE State=UP
EOF
  slurm_up slurmctld || /usr/sbin/slurmctld
  slurm_up slurmd || /usr/sbin/slurmd
  wait_for 60 "an idle node" idle || { daemon_logs; exit 1; }
  wait_for 60 "sacct (slurmdbd and its database)" sh -c "sacct -n >/dev/null 2>&1" || { daemon_logs; exit 1; }
  sinfo
}

stop() {
  if [ -e "$ETC/slurm.conf" ] && ! ours "$ETC/slurm.conf"; then
    log "refusing to stop: $ETC/slurm.conf was not written by this script, so the running SLURM is not its own"
    exit 4
  fi
  # Only the jobs of its own cluster's partition (the sweeps' jobs), not every job of the user.
  scancel --partition="$PARTITION" 2>/dev/null || true
  wait_for 30 "an empty $PARTITION queue" sh -c "[ -z \"\$(squeue -h -p $PARTITION 2>/dev/null)\" ]" || true
  local d pidfile
  for d in slurmd slurmctld slurmdbd; do
    if slurm_up "$d"; then kill "$(cat "$W/$d.pid")"; fi
  done
  for d in mariadbd:/var/run/mysqld/mysqld.pid munged:/var/run/munge/munged.pid; do
    pidfile=${d#*:}
    d=${d%%:*}
    if started_by_us "$d" "$pidfile" && running "$pidfile" "$d"; then kill "$(cat "$pidfile")"; fi
  done
  rm -f "$W/started"
  log "stopped"
}

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0  # sourced (tests): the functions only

cmd=${1:-start}
case "${2:-}" in
  "") ;;
  --force) FORCE=1 ;;
  *) echo "usage: $0 start [--force] | stop | status" >&2; exit 2 ;;
esac
case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start [--force] | stop | status" >&2; exit 2 ;;
esac
