#!/usr/bin/env bash
# Single node, torchrun: one process per GPU (per CPU slot on a CPU box).
#
#   NPROC_PER_NODE  processes on this node (default: GPUs visible, else 2)
#   MASTER_PORT     rendezvous port on 127.0.0.1 (default 29500)
#   MAX_RESTARTS    restart the job this many times when a rank fails (default 0); with
#                   checkpoint.resume=auto (the default) a restart resumes from the latest checkpoint.
#                   Errors no restart can fix (config, bad data, a missing file) are not retried.
#   DRY_RUN=1       validate, print the command and the DeepSpeed JSON, start nothing
#
#   NPROC_PER_NODE=8 launchers/torchrun.sh configs/tiny.yaml run.max_steps=100
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"

NPROC_PER_NODE=${NPROC_PER_NODE:-$(visible_gpus_or 2)}

# Restarts happen here, not in torchrun (--max-restarts 0): torchrun retries every failure alike,
# while this loop can leave alone the ones no restart can fix (common.sh: run_attempts).
job_step() {
  step=("$PYTHON" -m torch.distributed.run --nnodes 1 --nproc_per_node "$NPROC_PER_NODE"
    --master_addr 127.0.0.1 --master_port "$MASTER_PORT" --max-restarts 0 "${MTRAIN_TRAIN[@]}")
}

validate_config "$NPROC_PER_NODE"
job_step
if [ "${DRY_RUN:-0}" = 1 ]; then
  launch "${step[@]}" # prints and exits
fi
run_attempts "${MAX_RESTARTS:-0}"
