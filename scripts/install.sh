#!/usr/bin/env bash
# Set up everything mtrain needs on a fresh Debian machine: system packages (as root), a venv in
# .venv, and mtrain with its extras. Safe to re-run: finished steps are skipped.
#
#   MTRAIN_VENV=path   venv location (default .venv)
#   MTRAIN_EXTRAS=...  pip extras (default dev,mpi,wandb; add gpu on a CUDA machine)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MTRAIN_VENV:-.venv}
extras=${MTRAIN_EXTRAS:-dev,mpi,wandb}

# Debian packages: Slurm (a real local cluster for the launcher tests), munge, numactl, and g++ for
# the C++ op DeepSpeed builds for CPU Adam (optimizer offload).
debs=(slurm-wlm munge numactl g++)
if ! dpkg -s "${debs[@]}" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install: apt-get install ${debs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}" >/dev/null
  else
    echo "install: not root, skipping Debian packages ${debs[*]} (Slurm tests will skip)" >&2
  fi
fi

# On a machine without a GPU, keep torch on its CPU build: an unpinned torch pulls CUDA wheels.
constraint=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
  constraint=(-c constraints/cpu.txt)
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$venv/.mtrain-install"
want="$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -c1-16) $extras ${constraint[*]:-}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "install: pip install -e .[$extras] into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${constraint[@]}" -e ".[$extras]"
  echo "$want" > "$stamp"
fi
# Build DeepSpeed's CPU Adam (zero.offload_optimizer=cpu) now, once per environment, into the
# folder mtrain's processes load it from (TORCH_EXTENSIONS_DIR, default <venv>/torch_extensions; see
# mtrain.launch.distributed.use_environment_extension_cache): about a minute here, then a cached
# load of a second. Without a compiler the offload runs would fail at engine start.
if command -v g++ >/dev/null; then
  TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$("$venv/bin/python" -c 'import os, sys; print(os.path.join(sys.prefix, "torch_extensions"))')}" \
    "$venv/bin/python" -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(verbose=False)" \
    >/dev/null 2>&1 || echo "install: could not build DeepSpeed's CPU Adam op (zero.offload_optimizer=cpu needs it)" >&2
fi
echo "install: ready ($("$venv/bin/python" -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1))"
