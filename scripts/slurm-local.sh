#!/usr/bin/env bash
# A one-node Slurm on this machine (issue "Beyond one GPU": the scheduler GPU clusters run,
# tested for real): installs slurmctld, slurmd and munge from the distribution's packages where
# they are missing (needs root: apt-get), writes a minimal slurm.conf for this host (all CPUs,
# 90 % of its memory, one partition `debug`, no GPUs), and starts munged, slurmctld and slurmd.
# Idempotent: a running cluster is left as it is. Prints the node's state when ready.
#
# Usage: bash scripts/slurm-local.sh        (then: sinfo, sbatch, squeue, scancel)
set -euo pipefail
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurm-wlm munge >/dev/null
fi
host=$(hostname -s)
if sinfo -h -o '%T' 2>/dev/null | grep -Eq 'idle|mix|alloc'; then
  sinfo
  exit 0
fi
conf=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/log/munge
mem_mb=$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
cat > "$conf" <<CONF
# Written by vramcal's scripts/slurm-local.sh: one node, no accounting, no cgroups.
ClusterName=vramcal-local
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
[ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -Eq 'idle|mix|alloc'; then
    sinfo
    exit 0
  fi
  scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
  sleep 1
done
echo "error: the local Slurm did not come up; see /var/log/slurm/" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
