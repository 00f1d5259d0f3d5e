"""Start-up: time to the first batch of one rank, as the shard count grows.

    python benchmarks/startup.py [--sizes 100 1000 10000] [--repeats 3] [--world-size 16]

Writes 10,000 (the largest size) small synthetic caption shards (4 samples each) with an
index.json, then, for each size and each road, times what one rank of `--world-size` does before
training: build its loader (shard list, samples per shard) and take the first batch. Roads:

- local:           the shards on local disk, counts from index.json (each entry checked by size);
- http:            the same folder served by a loopback ThreadingHTTPServer (one index fetch, then
                   only the shards the first batch needs are copied; a fresh cache every time);
- local, no index: the shards without index.json (every shard's headers scanned once per rank),
                   for comparison.

The same work at every size: the timed rank's first batch (8 samples, and the 7 the planner reads
ahead) comes from 15 shards whatever the shard count, since the rank holds at least that many
samples even at the smallest size (100 shards x 4 samples / 16 ranks = 25). At 64 ranks it held
6 samples at 100 shards, read 6 shards instead of 15, and made 100 shards look cheaper than they are.

Target (issue 16): 10,000 shards cost <= 2x what 100 do, per road that uses the index. Times are
wall-clock seconds, median over repetitions; the ratio line is 10,000 vs 100 shards.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ratio_line, spread  # noqa: E402

from data_pipeline.loader import LoaderSettings, build_loader  # noqa: E402
from data_pipeline.sample_data import COLOURS, SHAPES, draw_shape  # noqa: E402
from data_pipeline.shards import INDEX_FILE, ShardCache  # noqa: E402
from data_pipeline.tokenize import TokenSpec  # noqa: E402
from mtrain.model.build import tiny_image_processor  # noqa: E402
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer  # noqa: E402
from tests.shard_server import serve_folder  # noqa: E402

SAMPLES_PER_SHARD = 4


def write_shards(folder: Path, count: int) -> None:
    """`count` tars of SAMPLES_PER_SHARD tiny caption pairs, and their index.json."""
    rng = random.Random(0)
    jpegs = []
    for _ in range(16):
        out = io.BytesIO()
        draw_shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng, 32).save(out, format="JPEG", quality=80)
        jpegs.append(out.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    samples, sizes = {}, {}
    for shard in range(count):
        name = f"shard-{shard:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for item in range(SAMPLES_PER_SHARD):
                for extension, data in (("jpg", rng.choice(jpegs)), ("txt", b"a small red circle.")):
                    info = tarfile.TarInfo(f"s{shard:06d}_{item}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        samples[name], sizes[name] = SAMPLES_PER_SHARD, (folder / name).stat().st_size
    (folder / INDEX_FILE).write_text(json.dumps({"format": "caption", "samples": samples, "bytes": sizes}))


def first_batch_seconds(
    pattern: str, world_size: int, cache_root: Path, spec: TokenSpec, processor
) -> tuple[float, float]:
    """(wall, CPU) seconds of one rank's loader built from nothing (fresh shard cache) until its
    first batch. CPU time counts this process only (the loopback server's thread included)."""
    cache = ShardCache(folder=tempfile.mkdtemp(dir=cache_root))
    settings = LoaderSettings(sources=((pattern, 1.0),), batch_size=8, seed=0, cache=cache)
    started, cpu_started = time.perf_counter(), time.process_time()
    loader = build_loader(settings, world_size - 1, world_size, spec, processor, 64)
    next(loader)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    shutil.rmtree(cache.folder)
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--world-size",
        type=int,
        default=16,
        help="the rank timed is the last of this many; keep 4 x the smallest size / this >= 15 (a full first batch)",
    )
    args = parser.parse_args()

    tokenizer = build_tiny_tokenizer()
    spec = TokenSpec(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), 96)
    processor = tiny_image_processor(32)
    roads = ("local", "http", "local, no index")
    # (road, size) -> [(wall, cpu)] over repetitions
    times: dict[tuple[str, int], list[tuple[float, float]]] = {(r, n): [] for r in roads for n in args.sizes}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_started = time.perf_counter()
        write_shards(root / "shards", max(args.sizes))
        for size in args.sizes:  # a folder without index.json per size: links to its first `size` shards
            (root / f"no-index-{size}").mkdir()
            for shard in range(size):
                name = f"shard-{shard:06d}.tar"
                (root / f"no-index-{size}" / name).symlink_to(root / "shards" / name)
        print(f"wrote {max(args.sizes)} shards in {time.perf_counter() - write_started:.1f}s")
        with serve_folder(root / "shards") as (url, _):
            # Sizes alternate within each repetition, so a change in the machine's load (it is
            # shared) weighs on every size alike rather than on whichever ran last.
            for repetition in range(args.repeats + 1):  # repetition 0 warms up (imports, first connection)
                for size in args.sizes:
                    last = f"{size - 1:06d}"
                    patterns = {
                        "local": f"{root}/shards/shard-{{000000..{last}}}.tar",
                        "http": f"{url}/shard-{{000000..{last}}}.tar",
                        "local, no index": f"{root}/no-index-{size}/shard-{{000000..{last}}}.tar",
                    }
                    for road, pattern in patterns.items():
                        timed = first_batch_seconds(pattern, args.world_size, root, spec, processor)
                        if repetition:
                            times[road, size].append(timed)
    for road in roads:
        for size in args.sizes:
            wall, cpu = zip(*times[road, size], strict=True)
            print(f"  {road:16s} {size:6d} shards: first batch {spread(wall, 3)} s wall, {spread(cpu, 3)} s CPU")
    small, large = min(args.sizes), max(args.sizes)
    print(f"\nStart-up, time to first batch of rank {args.world_size - 1} of {args.world_size}, "
          f"{SAMPLES_PER_SHARD} samples per shard, {args.repeats} alternating repetitions")  # fmt: skip
    for road in roads:
        for what, column in (("wall", 0), ("CPU ", 1)):
            before = [t[column] for t in times[road, small]]
            after = [t[column] for t in times[road, large]]
            ratios = [a / b for a, b in zip(after, before, strict=True)]  # each repetition against its own
            target = "" if road == "local, no index" else "<= 2.0"
            print(ratio_line(f"RATIO {road} {large}/{small} shards ({what})", ratios, target,
                             note=f"(median {statistics.median(before):.3f}s -> {statistics.median(after):.3f}s)"))  # fmt: skip


if __name__ == "__main__":
    main()
