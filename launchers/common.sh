# Shared by every script in launchers/ (sourced, not run). Each script is a thin layer over
#   mtrain train CONFIG [a.b.c=value ...]
# that only builds the launcher's command line. Before anything is spawned, the config and
# overrides are validated here, so a bad config fails on the submitting machine.
#
# Knobs common to all launchers (environment variables):
#   PYTHON       interpreter that has mtrain installed (default: python3, or the active venv's python)
#   DRY_RUN=1    validate, print the resolved command and the DeepSpeed JSON, start nothing
#   MASTER_PORT  rendezvous port (default 29500)
#   MTRAIN_LAUNCH_TIME  set once here (seconds since the epoch); ranks report the time to the first step

set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
  echo "usage: $0 CONFIG [a.b.c=value ...]" >&2
  exit 2
fi

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
MASTER_PORT=${MASTER_PORT:-29500}
export MTRAIN_LAUNCH_TIME=${MTRAIN_LAUNCH_TIME:-$(date +%s.%N)}

MTRAIN_CONFIG=$1
shift
MTRAIN_OVERRIDES=("$@")

# validate_config WORLD_SIZE: fail before spawning; under DRY_RUN also print the DeepSpeed JSON.
validate_config() {
  local world_size=$1
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "# DeepSpeed JSON at world size $world_size (precision 'auto' resolves on this machine):"
    "$PYTHON" -m mtrain validate "$MTRAIN_CONFIG" "${MTRAIN_OVERRIDES[@]}" --deepspeed-json "$world_size"
  else
    "$PYTHON" -m mtrain validate "$MTRAIN_CONFIG" "${MTRAIN_OVERRIDES[@]}"
  fi
}

# launch CMD...: print the command; run it unless DRY_RUN=1 (exec, so signals reach the launcher).
launch() {
  echo "# command:"
  printf '%q ' "$@"
  echo
  if [ "${DRY_RUN:-0}" = 1 ]; then
    exit 0
  fi
  exec "$@"
}

# The mtrain entry point every launcher starts, as module arguments.
MTRAIN_TRAIN=(-m mtrain train "$MTRAIN_CONFIG" "${MTRAIN_OVERRIDES[@]}")

require() {
  local name=$1 hint=$2
  if [ -z "${!name:-}" ]; then
    echo "$0: set $name ($hint)" >&2
    exit 2
  fi
}

# visible_gpus_or N: the number of CUDA devices this python sees, or N on a machine without any.
visible_gpus_or() {
  local gpus
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  if [ "$gpus" -gt 0 ]; then echo "$gpus"; else echo "$1"; fi
}
