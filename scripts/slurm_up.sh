#!/usr/bin/env bash
# A SLURM cluster on this machine (for the tests, CI and trying the launcher): munged [+ mariadbd +
# slurmdbd] + slurmctld on the host, and NODES compute nodes. Adapted from shared/recipes.
#   SLURM_ROOT=/tmp/slurm scripts/slurm_up.sh; export SLURM_CONF=$SLURM_ROOT/etc/slurm.conf
#   NODES=2 SLURM_ROOT=/tmp/slurm2 scripts/slurm_up.sh        # as root: nodes n1, n2; srun -N2 hostname
# NODES=1 (default): one slurmd on the host, node `localhost`. NODES>1: node nI is a slurmd in its own
# network + UTS namespace (hostname nI, address $SLURM_NET.(10+I) on the private bridge $SLURM_BRIDGE,
# whose host side is $SLURM_NET.1; no route and no NAT: nodes reach each other and the host only).
# `$SLURM_ROOT/bin/onnode nI CMD...` runs CMD on node nI. scripts/slurm_down.sh (same SLURM_ROOT) stops
# the daemons and removes the namespaces, the bridge and every process started inside them.
# Environment (all optional): SLURM_ROOT (default ./.slurm), NODES (1), SLURM_PORT_BASE (6817: slurmctld
#   PORT, slurmd PORT+1, slurmdbd PORT+2, mariadb PORT+3), WITH_SLURMDBD=1 (accounting: `sacct`),
#   SLURM_NET (10.213.77), SLURM_BRIDGE (br-edm2), SLURM_NS_PREFIX (edm2-), SLURMD_TIMEOUT (30) and
#   SLURM_MSG_TIMEOUT (10): a dead node goes DOWN after about SLURMD_TIMEOUT + 2 x SLURM_MSG_TIMEOUT s;
#   SLURM_FIRST_JOB_ID (1): job ids apart from another cluster's (submitit's watcher keys jobs by id).
#   SLURM_CPUS (nproc): the CPUs each node declares (a test cluster may oversubscribe).
# No systemd, no cgroups. Needs slurmctld slurmd slurm-client munge iproute2 (+ slurmdbd mariadb-server
# for WITH_SLURMDBD=1): `scripts/system-deps.sh slurm` installs them.
set -euo pipefail
S=${SLURM_ROOT:-$PWD/.slurm}
S=$(mkdir -p "$S" && cd "$S" && pwd)
N=${NODES:-1}
PORT=${SLURM_PORT_BASE:-6817}
case "$N" in ''|*[!0-9]*|0) echo "NODES=$N: give a number of nodes >= 1" >&2; exit 2 ;; esac
mkdir -p "$S"/{etc,state,spool,log,run,munge,bin}
chmod 700 "$S/munge"
[ -f "$S/munge/munge.key" ] || dd if=/dev/urandom bs=1 count=1024 of="$S/munge/munge.key" status=none
chmod 400 "$S/munge/munge.key"
if [ "${WITH_SLURMDBD:-0}" = 1 ]; then ACCT=slurmdbd; GATHER=linux; else ACCT=none; GATHER=none; fi

# --- compute nodes: the host itself (NODES=1), or one network + UTS namespace per node -----------------
CTLD_HOST=localhost
NODE_NAMES=(localhost)
if [ "$N" -gt 1 ]; then
  [ "$(id -u)" = 0 ] || { echo "NODES=$N needs root (network namespaces and a bridge)" >&2; exit 1; }
  NET=${SLURM_NET:-10.213.77}; BR=${SLURM_BRIDGE:-br-edm2}; P=${SLURM_NS_PREFIX:-edm2-}
  HOSTIP=$NET.1
  if ip link show "$BR" >/dev/null 2>&1 || [ -f "$S/run/net.env" ]; then
    echo "$BR or $S/run/net.env exists already: run scripts/slurm_down.sh first" >&2; exit 1
  fi
  NODE_NAMES=(); for i in $(seq 1 "$N"); do NODE_NAMES+=("n$i"); done
  ip_of() { echo "$NET.$((10 + ${1#n}))"; }
  for n in "${NODE_NAMES[@]}"; do
    v="vh-$P$n"; [ ${#v} -le 15 ] || { echo "interface name $v is too long: shorten SLURM_NS_PREFIX" >&2; exit 1; }
  done
  # What slurm_down.sh removes, written before anything exists (a failure half-way is cleaned up too).
  { echo "BR=$BR"; echo "HOSTIP=$HOSTIP"
    echo "NSS=\"$(for n in "${NODE_NAMES[@]}"; do printf '%s ' "$P$n"; done)\""
    echo "VETHS=\"$(for n in "${NODE_NAMES[@]}"; do printf '%s ' "vh-$P$n"; done)\""; } > "$S/run/net.env"
  ip link add "$BR" type bridge
  sysctl -qw "net.ipv6.conf.$BR.disable_ipv6=1" 2>/dev/null || true
  ip addr add "$HOSTIP/24" dev "$BR"
  ip link set "$BR" up
  CTLD_HOST="$(hostname -s)($HOSTIP)"
  for n in "${NODE_NAMES[@]}"; do
    ns="$P$n"; v="vh-$P$n"
    ip netns add "$ns"
    ip link add "$v" type veth peer name "${v}p"
    sysctl -qw "net.ipv6.conf.$v.disable_ipv6=1" 2>/dev/null || true
    ip link set "${v}p" netns "$ns"
    ip -n "$ns" link set "${v}p" name eth0
    ip -n "$ns" addr add "$(ip_of "$n")/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip link set "$v" master "$BR" up
    # gloo resolves the hostname to pick its interface: every node knows every node's name.
    { echo "127.0.0.1 localhost"; echo "$HOSTIP $(hostname -s)"
      for m in "${NODE_NAMES[@]}"; do echo "$(ip_of "$m") $m"; done; } > "$S/etc/hosts.$n"
  done
  # Not `ip netns exec`: it remounts /sys, /sys/fs/cgroup disappears and slurmd refuses to start.
  # nsenter takes the node's network namespace only; a private mount + UTS namespace gives it its own
  # /etc/hosts and hostname. Job steps inherit all three from their slurmd.
  cat > "$S/bin/onnode" <<ONNODE
#!/bin/sh
# usage: onnode NODE CMD [ARG...]   run CMD on NODE: its network namespace, hostname and /etc/hosts
n=\$1; shift
exec nsenter --net="/run/netns/$P\$n" unshare --mount --propagation private --uts \\
  sh -c 'mount --bind "$S/etc/hosts.\$0" /etc/hosts && hostname "\$0" && exec "\$@"' "\$n" "\$@"
ONNODE
  chmod 755 "$S/bin/onnode"
fi
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') / N ))

cat > "$S/etc/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=$CTLD_HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# own munged socket; cred_expire also sets the delay before a requeued job may restart (default 120 s)
AuthInfo=socket=$S/munge/munge.socket.2,cred_expire=10
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$S/state
# %n: one file per node, or the slurmds of one host overwrite each other's
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# every node declares all of this machine's cores (a test cluster oversubscribes) without being drained
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=${SLURMD_TIMEOUT:-30}
MessageTimeout=${SLURM_MSG_TIMEOUT:-10}
InactiveLimit=0
MinJobAge=300
FirstJobId=${SLURM_FIRST_JOB_ID:-1}
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
CONF
for n in "${NODE_NAMES[@]}"; do
  addr=""; [ "$N" = 1 ] || addr="NodeAddr=$(ip_of "$n") NodeHostname=$n "
  echo "NodeName=$n ${addr}CPUs=${SLURM_CPUS:-$(nproc)} RealMemory=$MEM State=UNKNOWN" >> "$S/etc/slurm.conf"
  mkdir -p "$S/spool/$n"
done
echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODE_NAMES[*]}") Default=YES MaxTime=INFINITE State=UP" \
  >> "$S/etc/slurm.conf"
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

slurmctld -f "$SLURM_CONF"                                     # daemonizes, on the host
for n in "${NODE_NAMES[@]}"; do                                # daemonize (on their nodes)
  if [ "$N" = 1 ]; then slurmd -f "$SLURM_CONF" -N "$n"; else "$S/bin/onnode" "$n" slurmd -f "$SLURM_CONF" -N "$n"; fi
done
for i in $(seq 1 120); do
  [ "$(timeout 5 sinfo -h -N -o %T 2>/dev/null | grep -c -E '^(idle|mixed|allocated)$')" -ge "$N" ] && break
  sleep 0.5
done
timeout 5 sinfo -N
echo "export SLURM_CONF=$SLURM_CONF"
