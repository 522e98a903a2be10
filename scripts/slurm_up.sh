#!/usr/bin/env bash
# One-node SLURM cluster on this machine (for the tests, CI and trying the launcher): munged +
# [mariadbd + slurmdbd] + slurmctld + slurmd, no systemd, no cgroups. Adapted from shared/recipes.
# Usage: SLURM_ROOT=/tmp/slurm scripts/slurm_up.sh; export SLURM_CONF=$SLURM_ROOT/etc/slurm.conf
# No systemd, no cgroups. Needs: apt-get install -y slurmctld slurmd slurm-client munge
#   (+ slurmdbd mariadb-server when WITH_SLURMDBD=1, for a working `sacct`).
set -euo pipefail
S=${SLURM_ROOT:-$PWD/.slurm}
PORT=${SLURM_PORT_BASE:-6817}            # slurmctld PORT, slurmd PORT+1, slurmdbd PORT+2, mariadb PORT+3
mkdir -p "$S"/{etc,state,spool,log,run,munge}
chmod 700 "$S/munge"
[ -f "$S/munge/munge.key" ] || dd if=/dev/urandom bs=1 count=1024 of="$S/munge/munge.key" status=none
chmod 400 "$S/munge/munge.key"
if [ "${WITH_SLURMDBD:-0}" = 1 ]; then ACCT=slurmdbd; GATHER=linux; else ACCT=none; GATHER=none; fi
cat > "$S/etc/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# own munged socket; cred_expire also sets the delay before a requeued job may restart (default 120 s)
AuthInfo=socket=$S/munge/munge.socket.2,cred_expire=10
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
JobCompType=jobcomp/filetxt
JobCompLoc=$S/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/$GATHER
AccountingStorageType=accounting_storage/$ACCT
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))
# munge socket used for the slurmctld<->slurmdbd link (else it uses /run/munge/munge.socket.2)
AccountingStoragePass=$S/munge/munge.socket.2
NodeName=localhost CPUs=$(nproc) RealMemory=$(free -m | awk '/^Mem:/{print $2}') State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$S/etc/slurm.conf"

munged --key-file="$S/munge/munge.key" --socket="$S/munge/munge.socket.2" --pid-file="$S/run/munged.pid" \
       --log-file="$S/log/munged.log" --seed-file="$S/munge/munged.seed" --force

if [ "$ACCT" = slurmdbd ]; then
  [ -d "$S/mysql/mysql" ] || mariadb-install-db --user=root --datadir="$S/mysql" \
      --auth-root-authentication-method=socket --skip-test-db > "$S/log/mariadb-install.log" 2>&1
  setsid mariadbd --user=root --datadir="$S/mysql" --socket="$S/run/mysql.sock" --pid-file="$S/run/mariadbd.pid" \
      --bind-address=127.0.0.1 --port=$((PORT + 3)) --log-error="$S/log/mariadb.err" --innodb-buffer-pool-size=64M \
      </dev/null >/dev/null 2>&1 &
  for i in $(seq 1 100); do mariadb-admin --socket="$S/run/mysql.sock" ping >/dev/null 2>&1 && break; sleep 0.2; done
  mariadb --socket="$S/run/mysql.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  cat > "$S/etc/slurmdbd.conf" <<DBD
AuthType=auth/munge
AuthInfo=socket=$S/munge/munge.socket.2
DbdHost=localhost
DbdPort=$((PORT + 2))
SlurmUser=root
LogFile=$S/log/slurmdbd.log
PidFile=$S/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
DBD
  chmod 600 "$S/etc/slurmdbd.conf"
  slurmdbd            # reads slurmdbd.conf next to $SLURM_CONF; daemonizes
  for i in $(seq 1 50); do timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
  timeout 10 sacctmgr -i add cluster ci >/dev/null 2>&1 || true
fi

slurmctld -f "$SLURM_CONF"              # daemonizes
slurmd -f "$SLURM_CONF" -N localhost    # daemonizes
for i in $(seq 1 60); do
  timeout 5 sinfo -h -o %T 2>/dev/null | grep -q -E '^(idle|mixed|allocated)$' && break; sleep 0.5
done
timeout 5 sinfo
