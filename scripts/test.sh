#!/usr/bin/env bash
# The test command: install (if needed), then the whole suite. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q -ra --durations=30 "$@" tests
