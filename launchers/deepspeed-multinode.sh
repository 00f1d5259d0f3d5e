#!/usr/bin/env bash
# Several nodes, the deepspeed runner with a hostfile. Run it once, on the first node.
#
#   HOSTFILE      MPI-style hostfile, one "hostname slots=GPUS" line per node (required)
#   MASTER_ADDR   address of the first node, reachable from every node (required: never guessed
#                 from `hostname -I`, which is not the right interface on every cluster)
#   MASTER_PORT   rendezvous port (default 29500)
#   DS_LAUNCHER   how the runner reaches the nodes: pdsh (ssh, default), openmpi or slurm (run it
#                 inside an allocation, e.g. from an sbatch script; hostfile names are Slurm node names)
#   NPROC_PER_NODE  processes per node for pdsh/slurm (default: every slot of the hostfile);
#                 openmpi always starts every slot of the hostfile
#   LAUNCHER_ARGS extra arguments for pdsh/mpirun/srun, one string (e.g. "--mca btl_tcp_if_include ib0")
#   DRY_RUN=1     validate, print the command and the DeepSpeed JSON, start nothing
#
#   HOSTFILE=hosts MASTER_ADDR=node01 DS_LAUNCHER=openmpi launchers/deepspeed-multinode.sh configs/tiny.yaml
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"

require HOSTFILE "an MPI-style hostfile: one 'hostname slots=N' line per node"
require MASTER_ADDR "the first node's address, reachable from every node"
[ -f "$HOSTFILE" ] || { echo "$0: HOSTFILE=$HOSTFILE does not exist" >&2; exit 2; }
DS_LAUNCHER=${DS_LAUNCHER:-pdsh}
case "$DS_LAUNCHER" in pdsh | openmpi | slurm) ;; *)
  echo "$0: DS_LAUNCHER=$DS_LAUNCHER; use pdsh, openmpi or slurm" >&2
  exit 2
  ;;
esac

# World size from the hostfile (lines "host slots=N"; comments and blank lines skipped).
read -r hosts slots < <(awk '!/^[[:space:]]*(#|$)/ { n++; s += (match($0, /slots=[0-9]+/) ? substr($0, RSTART + 6, RLENGTH - 6) : 1) }
  END { print n + 0, s + 0 }' "$HOSTFILE")
runner_args=(--hostfile "$HOSTFILE" --launcher "$DS_LAUNCHER" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
world_size=$slots
if [ -n "${NPROC_PER_NODE:-}" ] && [ "$DS_LAUNCHER" != openmpi ]; then
  runner_args+=(--num_gpus "$NPROC_PER_NODE")
  world_size=$((hosts * NPROC_PER_NODE))
fi
launcher_args=${LAUNCHER_ARGS:-}
if [ "$DS_LAUNCHER" = openmpi ]; then
  # The ranks read MASTER_ADDR/PORT themselves (mtrain/launch/env.py); mpirun forwards only what -x names.
  launcher_args="-x MASTER_ADDR=$MASTER_ADDR -x MASTER_PORT=$MASTER_PORT -x MTRAIN_LAUNCH_TIME $launcher_args"
fi
[ -n "$launcher_args" ] && runner_args+=(--launcher_args "$launcher_args")
# openmpi and slurm start ranks without ssh; a one-host hostfile still goes through that launcher.
[ "$DS_LAUNCHER" != pdsh ] && runner_args+=(--no_ssh_check)
[ "$hosts" = 1 ] && runner_args+=(--force_multi)

# The runner's slurm backend ignores --module, so it is given mtrain's entry file instead.
entry=(--module mtrain)
if [ "$DS_LAUNCHER" = slurm ]; then
  entry=("$("$PYTHON" -c 'import mtrain, os; print(os.path.dirname(mtrain.__file__))')/__main__.py")
fi

validate_config "$world_size"
launch "$PYTHON" -m deepspeed.launcher.runner "${runner_args[@]}" "${entry[@]}" "${MTRAIN_TRAIN[@]:2}"
