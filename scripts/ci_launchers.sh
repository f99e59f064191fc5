#!/usr/bin/env bash
# The launchers megapico's preemption tests also run under, on a Debian machine where we are root (CI, a dev box):
# Open MPI's mpirun, and a one-node SLURM cluster (munge + slurmctld + slurmd on this host, 2 tasks at most).
# Best effort: whatever cannot be set up is reported in one line and its tests skip (tests/test_preemption.py).
set -uo pipefail

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "ci_launchers: not root on a Debian machine; the mpirun and srun tests will skip"
  exit 0
fi
missing=()
command -v mpirun >/dev/null || missing+=(openmpi-bin)
command -v slurmctld >/dev/null || missing+=(slurm-wlm munge)
if [ ${#missing[@]} -gt 0 ]; then
  if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/tmp/ci_launchers_apt.log 2>&1; then
    echo "ci_launchers: apt-get install ${missing[*]} failed (/tmp/ci_launchers_apt.log); those tests will skip"
  fi
fi

if command -v slurmctld >/dev/null && ! sinfo -h >/dev/null 2>&1; then
  host=$(hostname)
  state=/var/spool/megapico-slurm  # its own state: another cluster's files there would stop slurmctld
  mkdir -p /etc/slurm "$state/ctld" "$state/d" /var/log/slurm /run/munge
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=megapico-ci
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SlurmUser=root
SlurmdUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=$state/d
StateSaveLocation=$state/ctld
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
  pkill -x slurmd; pkill -x slurmctld; sleep 1  # daemons of an earlier configuration
  slurmctld -c
  for _ in $(seq 30); do  # slurmd registers once at start (then every few minutes): the controller first
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 1
  done
  slurmd
  for _ in $(seq 30); do
    sinfo -h -o "%a %T" 2>/dev/null | grep -q "^up idle" && break
    sleep 1
  done
fi
echo "ci_launchers: mpirun $(command -v mpirun >/dev/null && echo present || echo absent);" \
     "SLURM $(sinfo -h -o '%a %T' 2>/dev/null | grep -q '^up idle' && echo up || echo absent)"
