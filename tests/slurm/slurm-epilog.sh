#!/bin/sh
# Slurm Epilog of the single-node Slurm (slurm.sh installs it as /etc/slurm/windtunnel-epilog.sh;
# slurmd runs it as root after every job). A cluster whose epilog takes long shows a finished or
# cancelled job COMPLETING (an active state) for that long; this one-node cluster ends a job within
# a second. So a test holds a job there: while /run/slurm/epilog-hold/$SLURM_JOB_ID exists, the
# job stays COMPLETING; at most 120 s, so a forgotten marker never wedges the node. An array task's
# SLURM_JOB_ID is its own number (`squeue -o %A`), not 122_1: slurmd's Epilog gets no array ids.
# Exits 0 whatever happens: a failing Epilog drains the node.
HOLD=/run/slurm/epilog-hold/${SLURM_JOB_ID:-none}
i=0
while [ $i -lt 120 ] && [ -e "$HOLD" ]; do
  sleep 1
  i=$((i + 1))
done
exit 0
