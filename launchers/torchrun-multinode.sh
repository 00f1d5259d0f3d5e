#!/usr/bin/env bash
# Several nodes, torchrun with c10d rendezvous. Run the same command on every node.
#
#   NNODES          nodes in the job, or MIN:MAX for an elastic job (required)
#   NPROC_PER_NODE  processes per node (default: GPUs visible, else 2)
#   RDZV_ENDPOINT   host:port of the rendezvous store, on one of the nodes (default MASTER_ADDR:MASTER_PORT)
#   MASTER_ADDR     first node's address, used when RDZV_ENDPOINT is not set
#   RDZV_ID         job id shared by all nodes (default: SLURM_JOB_ID, else "mtrain")
#   NODE_RANK       this node's rank; c10d assigns ranks itself, so it is only a hint (optional)
#   LOCAL_ADDR      this node's address as the others should reach it (optional; torchrun's --local-addr)
#   MAX_RESTARTS    restarts of the whole job when a process fails (default 3); with
#                   checkpoint.resume=auto (the default) each restart resumes from the latest checkpoint.
#                   Every agent restarts into the same rendezvous round; each round's workers get a
#                   fresh store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, set in common.sh). torchrun
#                   retries every failure alike, also errors no restart can fix (exit status 2).
#   RDZV_TIMEOUT    seconds a node waits for the others to join before failing (default 600)
#   DRY_RUN=1       validate, print the command and the DeepSpeed JSON, start nothing
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node01:29400 launchers/torchrun-multinode.sh configs/tiny.yaml
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"

require NNODES "nodes in the job, e.g. 2"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(visible_gpus_or 2)}
if [ -z "${RDZV_ENDPOINT:-}" ]; then
  require MASTER_ADDR "the first node's address (or set RDZV_ENDPOINT=host:port)"
  RDZV_ENDPOINT="$MASTER_ADDR:$MASTER_PORT"
fi
torchrun_args=(
  --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-mtrain}}"
  --rdzv-conf "join_timeout=${RDZV_TIMEOUT:-600}"
  --max-restarts "${MAX_RESTARTS:-3}"
)
[ -n "${NODE_RANK:-}" ] && torchrun_args+=(--node-rank "$NODE_RANK")
[ -n "${LOCAL_ADDR:-}" ] && torchrun_args+=(--local-addr "$LOCAL_ADDR")

validate_config "$(( ${NNODES##*:} * NPROC_PER_NODE ))"
launch "$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" "${MTRAIN_TRAIN[@]}"
