#!/usr/bin/env bash
# mpirun, Open MPI or MPICH (Hydra), one or several nodes. Each rank reads its place from the MPI
# environment (OMPI_COMM_WORLD_* or PMI_*) in mtrain/launch/env.py.
#
#   NP           total processes (default: NNODES x NPROC_PER_NODE, else 2)
#   NNODES, NPROC_PER_NODE  alternative to NP
#   HOSTFILE     hostfile for several nodes (Open MPI: "host slots=N"; MPICH: "host:N")
#   MASTER_ADDR  the first node's address; needed for several nodes unless mpi4py is installed
#                (then rank 0's host name is broadcast); single node: 127.0.0.1
#   MASTER_PORT  rendezvous port (default 29500)
#   MPIRUN       the mpirun to use (default: mpirun on PATH); Open MPI or MPICH is detected from it
#   MPI_ARGS     extra mpirun arguments, one string (e.g. "--mca btl_tcp_if_include ib0")
#   DRY_RUN=1    validate, print the command and the DeepSpeed JSON, start nothing
# As root, Open MPI also needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
#
#   NP=16 HOSTFILE=hosts MASTER_ADDR=node01 launchers/mpirun.sh configs/tiny.yaml
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"

MPIRUN=${MPIRUN:-mpirun}
if [ -n "${NNODES:-}" ] && [ -n "${NPROC_PER_NODE:-}" ]; then
  NP=${NP:-$((NNODES * NPROC_PER_NODE))}
fi
NP=${NP:-2}
mpi_args=(-np "$NP")
[ -n "${HOSTFILE:-}" ] && mpi_args+=(--hostfile "$HOSTFILE")
forward=(MASTER_PORT MTRAIN_LAUNCH_TIME)
[ -n "${MASTER_ADDR:-}" ] && forward+=(MASTER_ADDR)
export MASTER_PORT
if "$MPIRUN" --version 2>&1 | grep -qi "open mpi"; then
  for name in "${forward[@]}" PYTHONPATH; do
    [ -n "${!name:-}" ] && mpi_args+=(-x "$name")
  done
  # one rank per slot, no binding to cores: the ranks set their own threads
  mpi_args+=(--bind-to none)
else # MPICH / Hydra
  for name in "${forward[@]}" PYTHONPATH; do
    [ -n "${!name:-}" ] && mpi_args+=(-genv "$name" "${!name}")
  done
fi
# shellcheck disable=SC2206  # MPI_ARGS is a list of words on purpose
[ -n "${MPI_ARGS:-}" ] && mpi_args+=($MPI_ARGS)

validate_config "$NP"
launch "$MPIRUN" "${mpi_args[@]}" "$PYTHON" "${MTRAIN_TRAIN[@]}"
