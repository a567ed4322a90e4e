#!/bin/bash
# spurgen on several machines under SLURM: one `accelerate launch` per node, all processes joined over NCCL.
# Every stage runs this way (select-refs, finetune, generate, evaluate, run); the workspace must be on a file
# system that every node sees. Submit with: sbatch examples/slurm_multinode.sh
#
#SBATCH --job-name=spurgen
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=spurgen-%j.log

set -euo pipefail

WORKSPACE=${WORKSPACE:-$HOME/spurgen-work}     # holds spurgen.toml (see examples/paper.toml)
GPUS_PER_NODE=${GPUS_PER_NODE:-4}

MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

# A killed or timed-out job is resumed by submitting it again: spurgen run skips what is complete.
srun bash -c "accelerate launch \
    --multi_gpu \
    --num_machines $SLURM_NNODES \
    --num_processes $NUM_PROCESSES \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_ADDR \
    --main_process_port $MAIN_PORT \
    --mixed_precision bf16 \
    -m spurgen run -w $WORKSPACE --classes all --presets dreambooth-te,sfsl --sfsl-weight 0.05,0.1,0.2"
