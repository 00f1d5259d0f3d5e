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
#   MTRAIN_DEBUG=1      mtrain's own errors print their traceback, not just one line
#
# Exit status: 0 done; 2 an error no restart can fix (config, bad data, a missing file: never
# retried); 130 interrupted (SIGINT/SIGTERM; the last line says how to continue); 1 other failures.

set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
  echo "usage: $0 CONFIG [a.b.c=value ...]" >&2
  exit 2
fi

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
# torchrun (c10d rendezvous): give the workers of every rendezvous round a fresh store on a fresh
# port instead of the agents' shared one. With the shared store, workers keep their keys apart by
# TORCHELASTIC_RESTART_COUNT, which differs between nodes after one node's worker fails, and the
# restarted job hangs (mtrain/launch/distributed.py).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
MASTER_PORT=${MASTER_PORT:-29500}
export MTRAIN_LAUNCH_TIME=${MTRAIN_LAUNCH_TIME:-$(date +%s.%N)}

MTRAIN_CONFIG=$1
shift
MTRAIN_OVERRIDES=("$@")
# The command that continues this run, named in the summary line of an interrupted job.
MTRAIN_COMMAND=${MTRAIN_COMMAND:-$(printf '%q ' "$0" "$MTRAIN_CONFIG" "${MTRAIN_OVERRIDES[@]}")}
export MTRAIN_COMMAND=${MTRAIN_COMMAND% }

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

# run_attempts MAX_RESTARTS: run the job step `job_step` builds into step=(...) until it succeeds,
# at most 1 + MAX_RESTARTS times; each attempt resumes from the latest complete checkpoint
# (checkpoint.resume=auto) on its own port (the old store's may still be closing). Not retried:
# an error no restart can fix (a rank wrote $MTRAIN_NO_RETRY_FILE, or the step exited 2), and
# an interrupt (SIGINT/SIGTERM), after which the run's summary line is printed last.
run_attempts() {
  local max_restarts=$1 attempt status
  export MTRAIN_NO_RETRY_FILE=${MTRAIN_NO_RETRY_FILE:-${TMPDIR:-/tmp}/mtrain-no-retry.$$}
  export MTRAIN_SUMMARY_FILE=${MTRAIN_SUMMARY_FILE:-${TMPDIR:-/tmp}/mtrain-summary.$$}
  rm -f "$MTRAIN_NO_RETRY_FILE" "$MTRAIN_SUMMARY_FILE"
  interrupted=0
  trap 'interrupted=1' INT TERM
  for ((attempt = 0; attempt <= max_restarts; attempt++)); do
    job_step
    echo "mtrain: attempt $attempt (of 1 + $max_restarts restarts): ${step[*]}"
    status=0
    "${step[@]}" || status=$?
    if [ "$status" = 0 ]; then
      rm -f "$MTRAIN_NO_RETRY_FILE" "$MTRAIN_SUMMARY_FILE"
      exit 0
    fi
    # The ranks' own summary says so too: a non-interactive bash does not always run its INT trap when
    # the foreground command then exits normally (torchrun turns the signal into status 1), and a signal
    # sent to the ranks alone (by a scheduler) never reaches this shell; either way no restart.
    if [ "$interrupted" = 1 ] || grep -q "^mtrain: interrupted" "$MTRAIN_SUMMARY_FILE" 2>/dev/null; then
      if [ -s "$MTRAIN_SUMMARY_FILE" ]; then cat "$MTRAIN_SUMMARY_FILE" >&2; else echo "mtrain: interrupted" >&2; fi
      rm -f "$MTRAIN_NO_RETRY_FILE" "$MTRAIN_SUMMARY_FILE"
      exit 130
    fi
    if [ -s "$MTRAIN_NO_RETRY_FILE" ] || [ "$status" = 2 ]; then
      echo "mtrain: not retrying (no restart can fix this): $(cat "$MTRAIN_NO_RETRY_FILE" 2>/dev/null)" >&2
      rm -f "$MTRAIN_NO_RETRY_FILE" "$MTRAIN_SUMMARY_FILE"
      exit 2
    fi
    echo "mtrain: job step failed with status $status" >&2
    export MASTER_PORT=$((MASTER_PORT + 1))
  done
  echo "mtrain: giving up after $max_restarts restarts" >&2
  exit 1
}
