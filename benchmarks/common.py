"""Helpers shared by the benchmark scripts (not a test helper: nothing here asserts on speed)."""

from __future__ import annotations

import cProfile
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def in_turn(items: Iterable[T], round_index: int) -> list[T]:
    """`items` in order on even rounds, reversed on odd ones (ABBA): a drift in the machine's load favours none."""
    return list(items) if round_index % 2 == 0 else list(items)[::-1]


def scratch_with_shards(prefix: str) -> Path:
    """A fresh temporary folder holding `shards/`: the sample data, 4 shards of 48 samples."""
    from data_pipeline.sample_data import write_sample_shards  # noqa: PLC0415

    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    write_sample_shards(scratch / "shards", num_shards=4, samples_per_shard=48)
    return scratch


def timed_engine_steps(engine: Any, batches: list[dict], warmup: int, profile_to: Path | None = None) -> float:
    """Seconds per optimizer step over `batches[warmup:]`, after `warmup` untimed steps.

    The warm-up traces ZeRO-3's prefetch and allocates optimizer state; a barrier lines the ranks
    up before the clock starts, and another after the last step so the slowest rank is counted.
    With `profile_to`, cProfile (wall clock) covers the timed steps and writes its stats there.
    """
    import torch.distributed as dist  # noqa: PLC0415

    profiler = cProfile.Profile() if profile_to else None
    for index, batch in enumerate(batches):
        if index == warmup:
            dist.barrier()
            started = time.perf_counter()
            if profiler is not None:
                profiler.enable()
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
    dist.barrier()
    seconds = (time.perf_counter() - started) / (len(batches) - warmup)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile_to)
    return seconds


def launch_for_result(cmd: list[str], env: dict[str, str], out: Path, verbose: bool) -> dict:
    """Run one torchrun launch whose rank 0 writes its figures as JSON to `out`, and read them.

    A launch that wrote its figures and then failed in interpreter teardown (seen rarely here:
    "terminate called without an active exception" on rank 0 after the process group was
    destroyed) still counts, with a note on stderr; one that wrote nothing raises.
    """
    out.unlink(missing_ok=True)
    done = subprocess.run(cmd, env=env, stdout=None if verbose else subprocess.DEVNULL)
    if done.returncode != 0:
        if not out.is_file():
            raise subprocess.CalledProcessError(done.returncode, cmd)
        print(f"note: launch exited with {done.returncode} after writing {out.name} (teardown)", file=sys.stderr)
    return json.loads(out.read_text())


def leave_together(*engines: Any) -> None:
    """Tear down as `mtrain train` does (mtrain/engine/run.py): barrier, engines, then the process group.

    A rank that closes its gloo pairs while its peer's engine still holds ZeRO-3 work can make the
    peer abort at exit, failing a launch whose figures were already measured.
    """
    import torch.distributed as dist  # noqa: PLC0415

    dist.barrier()
    for engine in engines:
        engine.destroy()
    dist.destroy_process_group()


def spread(values: Sequence[float], digits: int = 2) -> str:
    """`median (min a, max b)`: every repeated figure is reported as its median with the spread."""
    return f"{statistics.median(values):.{digits}f} (min {min(values):.{digits}f}, max {max(values):.{digits}f})"


def ratio_line(label: str, values: Sequence[float], target: str = "", note: str = "") -> str:
    """`label : 1.23x  (min 1.01, max 1.40; target >= 1.0: meets)`, the target judged by the median.

    `target` is ">= 1.5" or "<= 1.15" (no unit: run_all.py reads the first `<number>x` of a line as
    the ratio). The min and max show the spread over repetitions; a noisy minimum below the
    target does not decide the verdict, the median does.
    """
    median = statistics.median(values)
    details = [f"min {min(values):.2f}, max {max(values):.2f}"]
    if target:
        op, bound = target.split()
        meets = median >= float(bound) if op == ">=" else median <= float(bound)
        details.append(f"target {target}: {'meets' if meets else 'MISSES'}")
    line = f"{label} : {median:.2f}x  ({'; '.join(details)})"
    return f"{line}  {note}" if note else line


# ── what a report says about where it was measured ─────────────────────────────────────────────
def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    load = os.getloadavg()
    return [f"- CPU: {cpu}, {os.cpu_count()} cores (nproc), no GPU",
            f"- memory: {mem_kb / 2**20:.1f} GiB; load average at start {load[0]:.2f} (other jobs share the machine)",
            f"- OS: {platform.platform()}, Python {platform.python_version()}"]  # fmt: skip


def versions() -> str:
    names = ["torch", "deepspeed", "transformers", "peft", "webdataset", "mtrain"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (source tree)" if name == "mtrain" else f"{name} not installed")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                             text=True).stdout  # fmt: skip
    return ", ".join(found) + f"; mtrain commit {commit.strip()}" + (" plus uncommitted changes" if changed else "")


# ── a realistic length mix, shared by packing.py and end_to_end.py ────────────────────────────
WORDS = "a the red green blue circle square triangle shape small large is on of with and near left right".split()
VISUAL_TOKENS = 64  # the tiny model's grid: 32 px images, 4 px patches
IMAGE_SIZE = 32
MIX_WEIGHTS = {"caption": 0.5, "conversation": 0.3, "interleaved": 0.2}


def lognormal_words(rng: random.Random, median: float, sigma: float, cap: int) -> str:
    count = max(1, min(cap, round(rng.lognormvariate(math.log(median), sigma))))
    return " ".join(rng.choice(WORDS) for _ in range(count))


def write_mix(out: Path, samples: int, seed: int, max_len: int, proportional: bool = False) -> list[tuple[str, float]]:
    """Caption, conversation and document shards (2 each) with lognormal text lengths; returns loader
    sources with the mixture weights 0.5/0.3/0.2. `samples` per kind, or with `proportional` that many
    in all, split by the weights (so a map-style dataset of every sample has the mixture's composition)."""
    from data_pipeline.sample_data import write_shape_shards  # noqa: PLC0415

    rng = random.Random(seed)
    cap = max_len - VISUAL_TOKENS - 16  # words are single tokens of the tiny tokenizer (plus spaces)

    def caption(colour: str, shape: str, jpeg: bytes) -> dict:
        return {"jpg": jpeg, "txt": lognormal_words(rng, 10, 0.6, cap // 2) + f" {colour} {shape}."}

    def conversation(colour: str, shape: str, jpeg: bytes) -> dict:
        turns = [{"from": "human", "value": "<image>\n" + lognormal_words(rng, 8, 0.5, 24)}]
        budget = cap // 2 - 40
        for _ in range(max(1, min(6, round(rng.lognormvariate(math.log(2), 0.6))))):
            answer = lognormal_words(rng, 25, 0.7, max(4, budget // 6)) + f" {colour} {shape}."
            turns += [{"from": "gpt", "value": answer}, {"from": "human", "value": lognormal_words(rng, 8, 0.5, 16)}]
        return {"json": json.dumps({"conversations": turns[:-1]}).encode(), "jpg": jpeg}

    def document(colour: str, shape: str, jpeg: bytes) -> dict:
        texts = [lognormal_words(rng, 60, 0.8, cap // 4), None, lognormal_words(rng, 60, 0.8, cap // 4)]
        return {"json": json.dumps({"texts": texts, "images": [None, "0.jpg", None]}).encode(), "0.jpg": jpeg}

    sources = []
    for kind, members in (("caption", caption), ("conversation", conversation), ("interleaved", document)):
        folder = out / kind
        count = round(samples * MIX_WEIGHTS[kind]) if proportional else samples
        write_shape_shards(folder, 2, count // 2, seed, kind, members, kind)
        sources.append((str(folder / f"{kind}-{{000000..000001}}.tar"), MIX_WEIGHTS[kind]))
    return sources
