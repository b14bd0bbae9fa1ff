#!/bin/bash
# Multi-node FSDP2 training on SLURM: one task per node, each starting one process per GPU through accelerate.
#
#   sbatch --nodes 2 examples/slurm_fsdp2.sh configs/grpo/flux_hps.yaml [key=value ...]
#
# The run folder (output_dir) must be on a file system every node sees: each process writes its own shard of each
# checkpoint there, and rank 0 the rest. Resume with the same node and GPU count (--resume latest); to change the
# count, export the checkpoint (diffalign export RUN --out DIR) and start from the export.
#SBATCH --job-name=diffalign-fsdp2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch --nodes N examples/slurm_fsdp2.sh CONFIG.yaml [key=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_NNODES:-1}
# sed reads the whole list (head would close the pipe early, and pipefail turns that SIGPIPE into a failure).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MASTER_PORT=${MASTER_PORT:-29500}
REPO=$(cd "$(dirname "$0")/.." && pwd)

# One srun task per node; SLURM_NODEID is that node's rank. Single quotes: expanded on each node, not here.
srun --kill-on-bad-exit=1 bash -c '
  accelerate launch \
    --config_file "'"$REPO"'/configs/accelerate/fsdp2_multinode.yaml" \
    --num_machines '"$NNODES"' \
    --num_processes '"$((NNODES * GPUS_PER_NODE))"' \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip '"$MASTER_ADDR"' \
    --main_process_port '"$MASTER_PORT"' \
    -m diffalign.cli train "$@" --resume auto
' bash "$CONFIG" "$@"
