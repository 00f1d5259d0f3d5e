#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU and no network: runs tests/gpu, then the throughput
# probe (scripts/gpu_probe.py: a ~0.8B tiny-llava from configs/gpu_probe.yaml, bf16, M3 at all
# scales in packed rows, ZeRO-3 at world size 1), then prints the results. About 4-6 minutes.
#
#   scripts/gpu-check.sh            on the GPU machine, from the repository root
#   scripts/gpu-check.sh wheels     beforehand, on a machine with PyPI: fills .whl/ with what the GPU
#                                   machine lacks, to travel with the working tree
#
# What the GPU machine lacks, brought as wheels in .whl/ (ignored by git; add `/.whl/` to
# .git/info/exclude): the GPU image has Python 3.12, torch with CUDA, transformers, peft,
# accelerate, safetensors, tokenizers, pillow, numpy, tensorboard, but no deepspeed, webdataset or
# braceexpand, and not deepspeed's hjson or pydantic. `wheels` does, with the versions of .venv:
#   pip wheel deepspeed==<.venv's> --no-deps -w .whl        (an sdist: builds a pure-Python wheel)
#   pip download --no-deps -d .whl webdataset==.. braceexpand==.. hjson==.. pydantic==..
#       annotated-types==.. typing-inspection==.. transformers==.. peft==..   (pure Python)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64
#       -d .whl pydantic-core==..                                               (compiled, for 3.12)
# transformers and peft travel too so the GPU runs the versions the CPU tests ran. flash-attn is
# optional: without it attention uses sdpa (its test is then skipped).
# On the GPU machine this script installs .whl/*.whl with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl   and PYTHONPATH=/tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if [ "${1:-}" = "wheels" ]; then
  set -e
  venv=${MTRAIN_VENV:-.venv}
  version() { "$venv/bin/python" -c "from importlib.metadata import version; print(version('$1'))"; }
  mkdir -p .whl
  "$venv/bin/python" -m pip wheel -q --no-deps -w .whl "deepspeed==$(version deepspeed)"
  pure=()
  for name in webdataset braceexpand hjson pydantic annotated-types typing-inspection transformers peft; do
    pure+=("$name==$(version "$name")")
  done
  "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: -d .whl "${pure[@]}"
  "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "pydantic-core==$(version pydantic-core)"
  ls -1 .whl
  du -sh .whl
  exit 0
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  echo "gpu-check: installing $(ls .whl/*.whl | wc -l) wheels from .whl into /tmp/site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu-check: wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${GPU_CHECK_OUT:-/tmp/gpu-check}
mkdir -p "$out"

"$python" - <<'EOF' | tee "$out/device.txt"
import torch, transformers, deepspeed
print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE'}; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"deepspeed {deepspeed.__version__}")
EOF

# The tests first (about 1-2 minutes), then the probe (about 1-2 minutes); each bounded so that
# the whole check ends within 6 minutes whatever happens.
timeout 190 "$python" -m pytest -q -p no:cacheprovider tests/gpu -rA 2>&1 | tee "$out/tests.txt"
tests_rc=${PIPESTATUS[0]}
MTRAIN_PROBE_TIMEOUT_S=${MTRAIN_PROBE_TIMEOUT_S:-140} timeout 170 "$python" scripts/gpu_probe.py 2>&1 | tee "$out/probe.txt"
probe_rc=${PIPESTATUS[0]}

echo
echo "==== gpu-check results ===="
cat "$out/device.txt"
grep -E "^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed" "$out/tests.txt" | tail -20
grep "^probe:" "$out/probe.txt" || echo "probe: no result (exit $probe_rc)"
echo "tests exit $tests_rc, probe exit $probe_rc; logs in $out"
[ "$tests_rc" = 0 ] && [ "$probe_rc" = 0 ]
