#!/usr/bin/env bash
# Single node, torchrun: one process per GPU (per CPU slot on a CPU box).
#
#   NPROC_PER_NODE  processes on this node (default: GPUs visible, else 2)
#   MASTER_PORT     rendezvous port on 127.0.0.1 (default 29500)
#   MAX_RESTARTS    restart all processes this many times when one fails (default 0); with
#                   checkpoint.resume=auto (the default) a restart resumes from the latest checkpoint
#   DRY_RUN=1       validate, print the command and the DeepSpeed JSON, start nothing
#
#   NPROC_PER_NODE=8 launchers/torchrun.sh configs/tiny.yaml run.max_steps=100
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"

NPROC_PER_NODE=${NPROC_PER_NODE:-$(visible_gpus_or 2)}

validate_config "$NPROC_PER_NODE"
launch "$PYTHON" -m torch.distributed.run --nnodes 1 --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr 127.0.0.1 --master_port "$MASTER_PORT" --max-restarts "${MAX_RESTARTS:-0}" "${MTRAIN_TRAIN[@]}"
