#!/usr/bin/env bash
# The main job: sample shards, then a 2-rank ZeRO-3 LoRA training of tiny-llava with progress,
# ending with a checkpoint in runs/tiny/checkpoints and a Hugging Face export in runs/tiny/export.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/mtrain data sample --out data/sample
exec .venv/bin/torchrun --nproc_per_node 2 --master_port "${MASTER_PORT:-29500}" -m mtrain train configs/tiny.yaml "$@"
