#!/usr/bin/env bash
# Shared body of the sbatch templates (sourced, not submitted): one `srun` task per device on every node.
# Extra arguments are Hydra overrides for recipes/train.py.
set -euo pipefail
cd "${LSP_ROOT:-$SLURM_SUBMIT_DIR}"          # the repository (submit from its root, or set LSP_ROOT)

# Tasks per node = trainer.devices, nodes = trainer.num_nodes: taken from the allocation, not typed twice.
NODES=${SLURM_JOB_NUM_NODES:-1}
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$(( SLURM_NTASKS / NODES ))}
TASKS_PER_NODE=${TASKS_PER_NODE%%(*}

# A stable run directory (the job id survives a requeue): the restarted job finds hpc_ckpt_*.ckpt there.
RUN_DIR=${RUN_DIR:-outputs/slurm/${SLURM_JOB_NAME}-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}}
mkdir -p "$RUN_DIR"

# Rendezvous: the first node of the allocation; a port that changes with each restart (the old one may linger).
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + (SLURM_JOB_ID * 10 + ${SLURM_RESTART_COUNT:-0}) % 20000 ))}

echo "lightning_sp: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${NODES} node(s) x ${TASKS_PER_NODE} tasks," \
     "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run directory ${RUN_DIR}"

# --kill-on-bad-exit: one failed rank ends the step instead of leaving the others in a collective.
srun --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --kill-on-bad-exit=1 \
    "${PYTHON:-python}" recipes/train.py hydra.run.dir="$RUN_DIR" \
    trainer.devices="$TASKS_PER_NODE" trainer.num_nodes="$NODES" "$@"
