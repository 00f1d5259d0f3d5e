"""Throughput probe for one GPU: `mtrain train configs/gpu_probe.yaml` on synthetic shards, then
tokens/s and MFU of the steady steps (the first WARMUP_STEPS are left out: allocation, ZeRO-3's
prefetch trace, cuBLAS autotuning).

    python scripts/gpu_probe.py                    # one GPU: the ~0.8B model of configs/gpu_probe.yaml
    MTRAIN_PROBE_CPU=1 python scripts/gpu_probe.py # the same path on the CPU at tiny size (a smoke test)

It trains through the real entry point (ZeRO-3 at world size 1, bf16, M3 at all scales in packed
rows), so what it measures is what `mtrain train` does, not a kernel benchmark.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "gpu_probe.yaml"
WARMUP_STEPS = 5
TIMEOUT_S = int(os.environ.get("MTRAIN_PROBE_TIMEOUT_S", "150"))  # the training run; gpu-check.sh's budget

# The same config at tiny-llava's CPU size: checks the probe's path, not its speed.
TINY_CPU = [
    "run.device=cpu",
    "run.max_steps=3",
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=4",
    "model.tiny.vision_hidden_size=32",
    "model.tiny.vision_layers=2",
    "model.tiny.image_size=32",
    "model.tiny.patch_size=4",
    "matryoshka.tokens.scales=[1,4,16,64]",
    "data.max_len=256",
    "data.micro_batch_size=2",
]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def device_name(cpu: bool) -> str:
    import torch  # noqa: PLC0415

    return "cpu" if cpu else torch.cuda.get_device_name(0)


def main() -> int:
    cpu = os.environ.get("MTRAIN_PROBE_CPU") == "1"
    work = Path(tempfile.mkdtemp(prefix="mtrain-probe-"))
    shards = work / "shards"
    sample = [sys.executable, "-m", "mtrain", "data", "sample", "--out", str(shards), "--shards", "2"]
    subprocess.run([*sample, "--per-shard", "200"], check=True, env=child_env(), capture_output=True)
    run_dir = work / "run"
    overrides = [f"run.dir={run_dir}", f"data.shards={shards}/shard-{{000000..000001}}.tar"]
    if cpu:
        overrides += TINY_CPU
    started = time.time()
    train = [sys.executable, "-m", "mtrain", "train", str(CONFIG), *overrides]
    try:
        proc = subprocess.run(train, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        sys.stderr.write(str(exc.stderr or "")[-8000:])
        print(f"probe: TIMED OUT after {TIMEOUT_S} s (MTRAIN_PROBE_TIMEOUT_S)")
        return 1
    wall_s = time.time() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        print(f"probe: FAILED (exit {proc.returncode}) after {wall_s:.0f} s")
        return 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = WARMUP_STEPS if len(metrics) > WARMUP_STEPS else len(metrics) - 1
    steady = metrics[first:]
    report = json.loads((run_dir / "ranks" / "rank00000.json").read_text())
    parameters = report["parameter_elements"]["constructed"]["total"]
    tokens_per_s = statistics.median(m["tokens_per_s"] for m in steady)
    step_s = statistics.median(m["step_time_s"] for m in steady)
    mfu = statistics.median(m.get("mfu", float("nan")) for m in steady)
    peak_memory = max(m.get("memory/max_allocated_gb", 0.0) for m in metrics)
    print(
        f"probe: {device_name(cpu)}, {parameters / 1e6:,.1f}M parameters, bf16, M3 [all scales, packed], ZeRO-3 x1: "
        f"{tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%} of 989 TFLOPs, {step_s * 1e3:.0f} ms/step "
        f"(median of steps {first + 1}-{len(metrics)}), peak memory {peak_memory:.1f} GB, "
        f"loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}, {wall_s:.0f} s in all"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
