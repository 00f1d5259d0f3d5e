"""Which sample comes next: epoch order, split by rank, mixture draws, and re-partitioning.

Every source has, per epoch, one global order of *positions* 0..N-1: its shards shuffled by
(seed, source, epoch), then the samples of every block of INTERLEAVED_SHARDS consecutive shards
shuffled together. That order does not depend on the world size or the number of workers.

Rank r of W takes the positions r, r + W, r + 2W, ... of that order (a sample-level split, so
ranks hold equal counts, within one sample, however unequal the shards are). A rank's cursor
is therefore a handful of integers: `{epoch, base, stride, offset, taken, backlog}`; the next
position is the front of `backlog`, else `base + offset + taken * stride`.

Re-partitioning for another world size (`repartition`) takes every old rank's cursor: every
position below the furthest cursor that some old rank has not taken yet becomes a `backlog`
item, shared out round-robin, and the new ranks continue from there with the new stride. No
position of the epoch is lost or taken twice.

In `resampled` mode positions are drawn with replacement by a counter-based generator
(seed, source, rank, draw), so the cursor is the draw count.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence

import numpy as np

# Which rule orders an epoch, saved with every data position: 1 shuffled shards with Python's
# `random` (before the start-up work of issue 16), 2 permutes them with NumPy's RandomState. A
# position saved under another rule resumes, but the rest of its epoch follows this rule.
ORDER_VERSION = 2

Cursor = dict  # JSON-serialisable: {"epoch", "base", "stride", "offset", "taken", "backlog"} or {"draws"}


# Shards whose samples are interleaved in the epoch order: a batch then mixes this many shards
# (a reader keeps about this many files open), while the order of a block is only a list of
# (shard, group) pairs of those shards.
INTERLEAVED_SHARDS = 8


class SourceOrder:
    """The global order of one source in one epoch: position -> (shard url, group index).

    Shards are shuffled by (seed, source, epoch) and taken in blocks of INTERLEAVED_SHARDS; the
    samples of a block are shuffled together by (seed, source, epoch, block). Building it costs a
    few vectorised passes over the shard counts (start-up, once per rank and epoch); a block's
    sample order is built only when a position in it is first looked up.
    """

    def __init__(
        self, urls: Sequence[str], counts: Sequence[int], seed: int, source: int, epoch: int, shuffle: bool
    ) -> None:
        self.seed, self.source, self.epoch, self.shuffle = seed, source, epoch, shuffle
        self.urls = urls
        self.counts = np.asarray(counts, dtype=np.int64)
        self.shards = shard_permutation(len(urls), f"{seed}/{source}/{epoch}") if shuffle else np.arange(len(urls))
        firsts = np.arange(0, len(urls), INTERLEAVED_SHARDS)
        block_sizes = np.add.reduceat(self.counts[self.shards], firsts) if len(urls) else self.counts
        self.block_starts: list[int] = np.concatenate(([0], np.cumsum(block_sizes)[:-1])).tolist()
        self.total = int(self.counts.sum())
        self._block_orders: dict[int, list[tuple[str, int]]] = {}

    def locate(self, position: int) -> tuple[str, int]:
        block = bisect.bisect_right(self.block_starts, position) - 1
        return self.block_order(block)[position - self.block_starts[block]]

    def block_order(self, block: int) -> list[tuple[str, int]]:
        if block not in self._block_orders:
            if len(self._block_orders) >= 4:
                self._block_orders.clear()
            shards = self.shards[block * INTERLEAVED_SHARDS : (block + 1) * INTERLEAVED_SHARDS].tolist()
            pairs = [(self.urls[shard], group) for shard in shards for group in range(self.counts[shard])]
            if self.shuffle:
                random.Random(f"{self.seed}/{self.source}/{self.epoch}/{block}").shuffle(pairs)
            self._block_orders[block] = pairs
        return self._block_orders[block]


def shard_permutation(count: int, key: str) -> np.ndarray:
    """A permutation of range(count) fixed by `key`, in C: a Python shuffle of 10,000 shards took
    as long as the rest of a rank's start-up. NumPy's legacy RandomState keeps its stream
    unchanged across NumPy versions, so a resumed run finds the same order."""
    words = np.frombuffer(hashlib.sha256(key.encode()).digest(), dtype=np.uint32)
    return np.random.RandomState(words).permutation(count)


def fresh_cursor(epoch: int, rank: int, world_size: int) -> Cursor:
    return {"epoch": epoch, "base": 0, "stride": world_size, "offset": rank, "taken": 0, "backlog": []}


def cursor_exhausted(cursor: Cursor, total: int) -> bool:
    """Whether the rank has no position left in the cursor's epoch."""
    return not cursor["backlog"] and cursor["base"] + cursor["offset"] + cursor["taken"] * cursor["stride"] >= total


def next_position(cursor: Cursor, total: int) -> int | None:
    """Advance the cursor; None when this rank has no position left in the epoch."""
    if cursor["backlog"]:
        return cursor["backlog"].pop(0)
    position = cursor["base"] + cursor["offset"] + cursor["taken"] * cursor["stride"]
    if position >= total:
        return None
    cursor["taken"] += 1
    return position


def draw_position(cursor: Cursor, total: int, seed: int, source: int, rank: int) -> int:
    """Resampled mode: a position drawn with replacement, reproducible from the draw count."""
    position = random.Random(f"{seed}/{source}/{rank}/draw/{cursor['draws']}").randrange(total)
    cursor["draws"] += 1
    return position


def draw_source(weights: list[float], seed: int, rank: int, draw: int) -> int:
    """The source of the `draw`-th sample of a rank, by weight, reproducible from the draw count."""
    if len(weights) == 1:
        return 0
    pick = random.Random(f"{seed}/mixture/{rank}/{draw}").random() * sum(weights)
    for source, weight in enumerate(weights):
        pick -= weight
        if pick < 0:
            return source
    return len(weights) - 1


def remaining_positions(cursors: list[Cursor], extra: list[int], total: int) -> tuple[list[int], int]:
    """(positions some old rank still owed below the frontier, the frontier) for one epoch.

    `cursors` are every old rank's cursor of one epoch and one partition (same base and stride).
    `extra` are positions taken from the order but not yet delivered (packing leftovers).
    """
    stride, base = cursors[0]["stride"], cursors[0]["base"]
    furthest = max(c["taken"] for c in cursors)
    owed = set(extra)
    for cursor in cursors:
        owed.update(cursor["backlog"])
        for k in range(cursor["taken"], furthest):
            position = base + cursor["offset"] + k * stride
            if position < total:
                owed.add(position)
    return sorted(owed), base + furthest * stride


def repartition(
    old_cursors: list[Cursor], old_leftovers: list[list[int]], rank: int, world_size: int, total: int
) -> Cursor:
    """This rank's cursor after a change of world size, losing and repeating no position of the epoch.

    `old_cursors[r]` is old rank r's cursor and `old_leftovers[r]` its undelivered positions of the
    cursor's epoch. A rank one epoch ahead has finished the older epoch (its planner moved on
    when it ran out), so it counts as having taken all of its share of that epoch. Ranks further
    apart than one epoch (a secondary source cycling on its own) restart the newest epoch.
    """
    epochs = {c["epoch"] for c in old_cursors}
    epoch = min(epochs)
    behind = [c for c in old_cursors if c["epoch"] == epoch]
    if max(epochs) - epoch > 1 or len({(c["base"], c["stride"]) for c in behind}) != 1:
        return fresh_cursor(max(epochs), rank, world_size)
    base, stride = behind[0]["base"], behind[0]["stride"]
    cursors, extra = [], []
    for old_rank, (cursor, leftovers) in enumerate(zip(old_cursors, old_leftovers, strict=True)):
        if cursor["epoch"] == epoch:
            cursors.append(cursor)
            extra += leftovers
        else:  # finished its share of `epoch`, whatever its offset was: past the end at any offset
            share = max(0, -(-(total - base) // stride))
            cursors.append({"base": base, "stride": stride, "offset": old_rank, "taken": share, "backlog": []})
    owed, frontier = remaining_positions(cursors, extra, total)
    return {
        "epoch": epoch,
        "base": frontier,
        "stride": world_size,
        # Dealt on from where the owed positions stopped, so the ranks' shares of the rest of the
        # epoch differ by at most one (else the rank ahead drops its last batch at the epoch's end).
        "offset": (rank - len(owed)) % world_size,
        "taken": 0,
        "backlog": owed[rank::world_size],
    }
