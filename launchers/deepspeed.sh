#!/usr/bin/env bash
# Single node, the deepspeed launcher: one process per GPU (per CPU slot on a CPU box).
#
#   NPROC_PER_NODE  processes on this node (default: GPUs visible, else 2); passed as --num_gpus,
#                   which a CPU box needs (without it the deepspeed launcher starts one rank)
#   MASTER_PORT     rendezvous port on 127.0.0.1 (default 29500)
#   DRY_RUN=1       validate, print the command and the DeepSpeed JSON, start nothing
#
#   NPROC_PER_NODE=8 launchers/deepspeed.sh configs/tiny.yaml
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"

NPROC_PER_NODE=${NPROC_PER_NODE:-$(visible_gpus_or 2)}
validate_config "$NPROC_PER_NODE"
launch "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC_PER_NODE" --master_addr 127.0.0.1 \
  --master_port "$MASTER_PORT" --module "${MTRAIN_TRAIN[@]:1}"
