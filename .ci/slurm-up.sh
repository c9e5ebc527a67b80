#!/usr/bin/env bash
# Start a single-node Slurm on this machine, on loopback, for the job-script tests in test_jobs.py:
# partitions thin_course (default) and gpu_course, one GPU the node advertises without a real device,
# and accounting (sacct) through slurmdbd with a private MariaDB. Run as root; safe to run twice.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
if ! dpkg -s "${packages[@]}" >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi
if sinfo -h -o %T 2>/dev/null | grep -q idle && sacctmgr -n list cluster >/dev/null 2>&1; then  # accounting too: sacct
    echo "slurm: already up"
    exit 0
fi

state=/var/lib/pcam-slurm
mkdir -p /etc/slurm "$state"/{ctld,spool,mysql} /var/log/slurm /run/munge /run/mysqld
node_hardware=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //; s/ RealMemory=\([0-9]*\)/ RealMemory=\1/')
memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$node_hardware")
node_hardware=${node_hardware/RealMemory=$memory/RealMemory=$((memory * 9 / 10))}

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=pcam
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
GresTypes=gpu
JobRequeue=1
ReturnToService=2
SchedulerParameters=sched_interval=5,bf_interval=5
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 $node_hardware Gres=gpu:1 State=UNKNOWN
PartitionName=thin_course Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu_course Nodes=localhost MaxTime=INFINITE State=UP
CONF
echo "NodeName=localhost Name=gpu File=/dev/null" > /etc/slurm/gres.conf
cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
CONF
chmod 600 /etc/slurm/slurmdbd.conf

chown munge:munge /run/munge
[[ -s /etc/munge/munge.key ]] || mungekey --create
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

if ! pgrep -x mariadbd >/dev/null; then
    rm -f /run/mysqld/mysqld.sock  # a server killed with its caller leaves it
    [[ -d $state/mysql/mysql ]] || mariadb-install-db --datadir="$state/mysql" --user=root >/dev/null
    setsid mariadbd --datadir="$state/mysql" --user=root --skip-networking --socket=/run/mysqld/mysqld.sock \
        --log-error=/var/log/slurm/mariadb.log >/dev/null 2>&1 &
    for _ in $(seq 50); do [[ -S /run/mysqld/mysqld.sock ]] && break; sleep 0.2; done
fi
pgrep -x slurmdbd >/dev/null || slurmdbd
for _ in $(seq 50); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
sacctmgr -i -Q add cluster pcam >/dev/null 2>&1 || true
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd -N localhost

for _ in $(seq 120); do
    if sinfo -h -o %T | grep -q idle; then
        sinfo
        exit 0
    fi
    sleep 0.5
done
echo "slurm did not come up; logs in /var/log/slurm" >&2
sinfo >&2 || true
exit 1
