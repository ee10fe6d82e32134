#!/bin/bash
# SLURM: one llmtune per machine, each starting one process per GPU; they meet at node 0.
# Submit from the repository root:  sbatch recipes/launch/slurm.sh recipes/sft/qwen2.5-1.5b-full-chat.yaml
# Every machine needs the same recipe, data and output folder (a shared file system); only
# rank 0 writes the run directory.
#SBATCH --job-name=llmtune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one llmtune per machine; it starts the per-GPU processes
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=%x-%j.log
set -euo pipefail

RECIPE=${1:?usage: sbatch recipes/launch/slurm.sh RECIPE [BACKEND]}
BACKEND=${2:-zero3}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# SLURM_NODEID differs per machine, so it is read inside the step, on each machine.
srun bash -c "llmtune train '$RECIPE' --backend '$BACKEND' --num-processes auto \
  --nodes $SLURM_NNODES --node-rank \$SLURM_NODEID --main-addr $MAIN_ADDR --main-port 29500"
