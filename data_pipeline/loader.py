"""The streaming loader, as a visible list of stages.

     1 shard list        brace patterns, globs, URLs; several sources, each with a mixture weight;
                         samples per shard from index.json (checked) or one scan per rank
     2 shuffle           shards by (seed, source, epoch); samples of every 8 shards together
     3 split             by rank: position r, r+W, r+2W ... of the epoch order (epoch_order.py);
                         then by worker: worker w of N builds batches w, w+N, w+2N ...
     4 tar read          header scan once per shard, members read by seek (shards.py); remote
                         and gzipped shards through a local copy, retried, shared per machine
     5 safe decode       PIL for images, json, UTF-8 text; never pickle, whatever the extension
     6 build sample      interleaved document / caption pair / conversation (formats.py); or a
                         (query, positive, negative) pair (pairs.py): the form's `tokenize`
     7 tokenize          every <image> -> that image's number of visual tokens (tokenize.py);
                         `visual_tokens` is an int, or a function sample -> count per image; where
                         images differ in count (Qwen's native resolution, anyres sizes:
                         `image_tokens`), each image's own, from its size read in its header
     8 mask labels       image tokens, BOS, prompts, user turns, padding
     9 pack              whole documents into rows of max_len (packing.py)
    10 preprocess image  through the model's image processor (images.py); where images differ in count,
                         each decoded image is checked to have its header's size and its run's count
    11 collate           right-padded tensors; position ids restart per document; the form's `collate`

    planner (every worker, cheap: text, and image headers where counts differ) ── stages 1-9 ──► plan i
    worker i % N (images only for its own plans) ── stages 5, 10, 11 ──► batch i
    main process ── StreamingLoader: epoch sync across ranks, fault counts, state_dict()

Every worker runs the same deterministic planner, so batch i is the same for 0, 1 or 2 workers,
and a resume needs only the planner state after the last batch taken: the rank's cursor per
source, the mixture draw count, and the packing leftovers (as positions, re-read on resume).
Each batch carries that state; the main process keeps the state of the last batch it handed out.

Epoch modes (`epoch_mode`):
- "epoch": each sample once per epoch. Ranks hold equal sample counts (the sample-level split),
  and the epoch ends on every rank at the same batch: the main process agrees on it with one
  tiny all-reduce per batch, and a rank with batches left drops them (counted as `dropped`).
- "resampled": endless draws with replacement; no epoch boundary, so nothing to agree on.

Bad data is skipped and counted by reason (formats.FAULT_REASONS); past `max_bad_fraction` of
the samples seen (after `bad_fraction_min_samples`), the loader stops the job with an error that
names the reason, shard and key of the last bad sample.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.epoch_order import (
    ORDER_VERSION,
    SourceOrder,
    cursor_exhausted,
    draw_position,
    draw_source,
    fresh_cursor,
    next_position,
    repartition,
)
from data_pipeline.formats import (
    FAULT_REASONS,
    IMAGE_EXTENSIONS,
    Sample,
    SampleFault,
    SampleRules,
    build_sample,
    decode_image,
    is_image_member,
    open_image,
)
from data_pipeline.images import ImagePreprocessor
from data_pipeline.packing import Row, collate_rows, take_row
from data_pipeline.shards import ShardCache, ShardReader, expand_shards, shard_counts
from data_pipeline.tokenize import IGNORE_INDEX, TokenizedSample, TokenSpec, check_image_runs, tokenize_sample

__all__ = ["IGNORE_INDEX", "IMAGE_EXTENSIONS", "DataQualityError", "LoaderSettings", "SampleStream", "StreamingLoader"]

EPOCH_MODES = ("epoch", "resampled")
# Samples seen before "most samples keep nothing within max_len" may stop the job.
NOTHING_LEARNED_MIN_SAMPLES = 16
VisualTokens = int | Callable[[Sample], list[int]]
# An image's own visual-token count from its (height, width), for models whose images differ in count (Qwen's
# native resolution, anyres crops): the planner reads the size from the image's header, no pixel decoded.
ImageTokens = Callable[[tuple[int, int]], int]
# (height, width) of a tar group's image member, from its header: what a form is given to count by size.
ImageSize = Callable[[str], tuple[int, int]]
# An image's header (its size) lies in its first bytes. JPEG's EXIF and ICC segments can push it further: a
# header PIL cannot parse from this many bytes is read again whole.
HEADER_BYTES = 64 * 1024


class DataQualityError(RuntimeError):
    """Too much of the data is bad: stop, and say where."""


class SampleForm(Protocol):
    """Stages 6-8 and 11 of one kind of batch; every other stage is the loader's.

    `tokenize` gets a tar group's text members (image members present as b"") and `image_size` (an image
    member's (height, width), read from its header on call: for forms that count tokens by image size), and
    returns a document with `key`, `images` (ImageSegments, decoded later by the worker that owns the batch),
    `pixel_values`, `ref`, `location` and a length; it raises SampleFault for a bad sample."""

    packable: bool  # whether documents may share a row (data.packing)

    def tokenize(self, key: str, members: dict[str, bytes], image_size: ImageSize) -> Any: ...

    def collate(self, rows: list[list[Any]], stack: Callable[[list], torch.Tensor]) -> dict[str, Any]: ...


class DocumentForm:
    """Documents, captions and conversations: token ids with labels, packable (formats.py, tokenize.py)."""

    packable = True

    def __init__(
        self,
        rules: SampleRules,
        spec: TokenSpec,
        visual_tokens: VisualTokens,
        packing: bool,
        image_tokens: ImageTokens | None = None,
    ) -> None:
        self.rules, self.spec, self.visual_tokens, self.packing = rules, spec, visual_tokens, packing
        # Each image's own count from its header's size; None: every image has `visual_tokens`.
        self.image_tokens = image_tokens

    def tokenize(self, key: str, members: dict[str, bytes], image_size: ImageSize | None = None) -> TokenizedSample:
        sample = build_sample(key, members, self.rules)
        if self.image_tokens is None or image_size is None:
            return self.tokens(sample)
        return self.tokens(sample, {image.member: image_size(image.member) for image in sample.images})

    def tokens(self, sample: Sample, image_sizes: dict[str, tuple[int, int]] | None = None) -> TokenizedSample:
        """Stages 7-8 of a built sample, as training does them (`mtrain data validate --config` too).

        With `image_sizes` (member -> (height, width), from the headers) and `image_tokens`, each <image> is
        expanded to its own count, so packing and the max_len cut see every image's real length; without them,
        to `visual_tokens` (at native resolution the reference grid's count: an upper bound)."""
        if self.image_tokens is not None and image_sizes is not None:
            counts: VisualTokens | list[int] = [self.image_tokens(image_sizes[image.member]) for image in sample.images]
        else:
            counts = self.visual_tokens if isinstance(self.visual_tokens, int) else self.visual_tokens(sample)
        tokens = tokenize_sample(sample, self.spec, counts)
        if image_sizes is not None:  # the kept images' sizes, which decoding must confirm (SampleStream.load_pixels)
            tokens.image_sizes = [image_sizes[image.member] for image in tokens.images]
        if self.rules.require_image and not tokens.images:
            # Under ZeRO-3 a batch without images would skip the vision tower on one rank only.
            raise SampleFault("no_image", f"{sample.key}: every image lies past max_len={self.spec.max_len}")
        return tokens

    def collate(self, rows: list[Row], stack: Callable[[list], torch.Tensor]) -> dict[str, Any]:
        return collate_rows(rows, self.spec.tokenizer.pad_token_id, self.packing, stack)


@dataclass(frozen=True)
class LoaderSettings:
    sources: tuple[tuple[str, float], ...]  # (shard pattern, mixture weight); the first defines the epoch
    batch_size: int
    seed: int
    num_workers: int = 0
    shuffle: bool = True
    packing: bool = False
    pack_window: int = 64
    epoch_mode: str = "epoch"
    max_bad_fraction: float = 0.05
    bad_fraction_min_samples: int = 200
    rules: SampleRules = field(default_factory=SampleRules)
    cache: ShardCache = field(default_factory=ShardCache)

    def __post_init__(self) -> None:
        if self.epoch_mode not in EPOCH_MODES:
            raise ValueError(f"epoch_mode={self.epoch_mode!r}: use one of {', '.join(EPOCH_MODES)}")
        if not self.sources or any(weight <= 0 for _, weight in self.sources):
            raise ValueError(f"sources={self.sources!r}: give at least one source, every weight > 0")


# ── the planner: stages 1-9, text only ────────────────────────────────────────────────────────
class Planner:
    """Deterministic batch plans of one rank: rows of tokenized samples, images not yet decoded."""

    def __init__(
        self,
        settings: LoaderSettings,
        rank: int,
        world_size: int,
        spec: TokenSpec,
        form: SampleForm,
        reader: ShardReader,
        state: dict[str, Any] | None,
        shards: list[tuple[list[str], list[int]]],
    ) -> None:
        self.settings, self.rank, self.world_size = settings, rank, world_size
        self.spec, self.form, self.reader = spec, form, reader
        self.urls = [urls for urls, _ in shards]
        self.counts = [counts for _, counts in shards]  # shared with the stream: never modified
        self.totals = [sum(counts) for counts in self.counts]
        self.weights = [weight for _, weight in settings.sources]
        self.state = state if state is not None else initial_state(settings, rank, world_size)
        self._orders: dict[tuple[int, int], SourceOrder] = {}

    @property
    def resampled(self) -> bool:
        return self.settings.epoch_mode == "resampled"

    def order(self, source: int, epoch: int) -> SourceOrder:
        if (source, epoch) not in self._orders:
            if len(self._orders) > 8:
                self._orders.clear()
            self._orders[(source, epoch)] = SourceOrder(
                self.urls[source], self.counts[source], self.settings.seed, source, epoch, self.settings.shuffle
            )
        return self._orders[(source, epoch)]

    def next_ref(self) -> tuple[int, int, int] | None:
        """(source, epoch, position) of the next sample; None when the epoch's first source is done."""
        state = self.state
        if not self.resampled and cursor_exhausted(state["cursors"][0], self.totals[0]):
            return None  # checked before drawing, so no secondary sample slips in after the end
        source = draw_source(self.weights, self.settings.seed, self.rank, state["draws"])
        state["draws"] += 1
        cursor = state["cursors"][source]
        total = self.totals[source]
        if self.resampled:
            return source, 0, draw_position(cursor, total, self.settings.seed, source, self.rank)
        position = next_position(cursor, total)
        if position is None and source == 0:
            return None
        if position is None:  # a secondary source cycles on its own
            cursor.update(fresh_cursor(cursor["epoch"] + 1, self.rank, self.world_size))
            position = next_position(cursor, total)
            if position is None:
                raise ValueError(
                    f"source {source} ({self.settings.sources[source][0]}) has no samples for rank {self.rank}"
                )
        return source, cursor["epoch"], position

    def fetch(self, ref: tuple[int, int, int]) -> TokenizedSample:
        """Read the text members of one position, build and tokenize it; raises SampleFault."""
        source, epoch, position = ref
        url, group_index = self.order(source, epoch).locate(position)
        scan = self.reader.scan(url)
        try:
            if group_index >= len(scan.groups):  # the shard holds fewer samples than its index says
                raise SampleFault(*missing_sample_fault(scan, self.counts[source][self.urls[source].index(url)]))
            group = scan.groups[group_index]
            if group.fault is not None:
                raise SampleFault(*group.fault)
            text_members = [ext for ext in group.members if not is_image_member(ext)]
            members = self.reader.read(url, group, text_members)
            members.update({ext: b"" for ext in group.members if is_image_member(ext)})  # presence only
            tokens = self.form.tokenize(group.key, members, lambda member: self.image_size(url, group, member))
        except SampleFault as fault:
            fault.location = (url, group.key if group_index < len(scan.groups) else f"<missing:{group_index}>")
            raise
        tokens.ref, tokens.location = ref, (url, group)
        return tokens

    def image_size(self, url: str, group: Any, member: str) -> tuple[int, int]:
        """(height, width) of an image member from its header, no pixel decoded; raises SampleFault for a corrupt
        or oversize image, as decoding would."""
        max_pixels = self.settings.rules.max_image_pixels
        head = self.reader.read(url, group, [member], limit=HEADER_BYTES)[member]
        try:
            image = open_image(head, group.key, member, max_pixels)
        except SampleFault as fault:
            if fault.reason != "corrupt_image" or len(head) < HEADER_BYTES:
                raise
            image = open_image(self.reader.read(url, group, [member])[member], group.key, member, max_pixels)
        return image.height, image.width

    def plans(self) -> Iterator[dict[str, Any]]:
        """Batch plans forever: {"rows", "epoch", "state" (after this plan), "faults"}."""
        settings = self.settings
        buffer = [self.fetch(tuple(ref)) for ref in self.state["pending"]]
        want = settings.pack_window if settings.packing else settings.batch_size
        while True:
            epoch, faults, rows, exhausted = self.state["epoch"], [], [], False
            while len(rows) < settings.batch_size:
                while len(buffer) < want and not exhausted:
                    ref = self.next_ref()
                    if ref is None:
                        exhausted = True
                        break
                    try:
                        buffer.append(self.fetch(ref))
                    except SampleFault as fault:
                        faults.append([fault.reason, *fault.location, fault.detail, fault.needed])
                if not buffer:
                    break
                rows.append(take_row(buffer, self.spec.max_len) if settings.packing else [buffer.pop(0)])
            self.state["pending"] = [list(doc.ref) for doc in buffer]
            if exhausted and not buffer:  # the epoch ends with this plan
                self.state["epoch"] = epoch + 1
                self.state["cursors"][0] = fresh_cursor(epoch + 1, self.rank, self.world_size)
            if rows or faults:
                yield {"rows": rows, "epoch": epoch, "state": _copy_state(self.state), "faults": faults}


def missing_sample_fault(scan: Any, indexed: int) -> tuple[str, str]:
    """(reason, detail) for a position past the end of a shard: its truncation, or a stale index."""
    truncations = [g.fault for g in scan.groups if g.fault is not None and g.fault[0] == "truncated_tar"]
    if truncations:
        return truncations[-1]
    return (
        "unreadable_shard",
        f"{scan.url}: index.json says {indexed} samples, the shard holds {len(scan.groups)}; "
        "the index is stale: rewrite it with `mtrain data index FOLDER`",
    )


def initial_state(settings: LoaderSettings, rank: int, world_size: int) -> dict[str, Any]:
    """A rank's planner state at the start of training."""
    resampled = settings.epoch_mode == "resampled"
    cursors = [{"draws": 0} if resampled else fresh_cursor(0, rank, world_size) for _ in settings.sources]
    return {"epoch": 0, "cursors": cursors, "draws": 0, "pending": []}


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "epoch": state["epoch"],
        "cursors": [{**c, **({"backlog": list(c["backlog"])} if "backlog" in c else {})} for c in state["cursors"]],
        "draws": state["draws"],
        "pending": [list(ref) for ref in state["pending"]],
    }


# ── the per-rank dataset: planner in every worker, images only for its own batches ────────────
class SampleStream(IterableDataset):
    """Endless batches of one rank; each carries `_loader` metadata for the StreamingLoader."""

    def __init__(
        self,
        settings: LoaderSettings,
        rank: int,
        world_size: int,
        spec: TokenSpec,
        image_processor: Any,
        visual_tokens: VisualTokens,
        gather: Callable[[Any], list[Any]] | None = None,
        form: SampleForm | None = None,
        image_tokens: ImageTokens | None = None,
    ) -> None:
        super().__init__()
        # Each image's own count from its size (read from its header when planning); None: every image has
        # `visual_tokens`.
        self.image_tokens = image_tokens
        if form is not None and settings.packing and not form.packable:
            raise ValueError(f"data.packing=true: {type(form).__name__} batches cannot be packed; set it to false")
        self.settings, self.rank, self.world_size = settings, rank, world_size
        self.spec, self.visual_tokens = spec, visual_tokens
        if form is None:
            form = DocumentForm(settings.rules, spec, visual_tokens, settings.packing, image_tokens)
        self.form = form
        self.preprocess = ImagePreprocessor(image_processor)
        self.start_state: dict[str, Any] | None = None
        # Samples per shard, resolved once per rank here (index.json, else a scan) and handed to the
        # workers with the dataset, so start-up does not repeat per worker.
        self.cache = replace(settings.cache, session=f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        reader = ShardReader(cache=self.cache)
        self.shards, self.scanned = [], 0
        for pattern, _ in settings.sources:
            urls = expand_shards(pattern)
            counts, scanned = shard_counts(urls, reader, rank, world_size, gather)
            self.shards.append((urls, counts))
            self.scanned += scanned

    def planner(self, reader: ShardReader) -> Planner:
        return Planner(
            self.settings,
            self.rank,
            self.world_size,
            self.spec,
            self.form,
            reader,
            self.start_state,
            self.shards,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardReader(cache=self.cache)
        for index, plan in enumerate(self.planner(reader).plans()):
            if index % num_workers == worker:
                yield self.materialize(plan, reader)

    def materialize(self, plan: dict[str, Any], reader: ShardReader) -> dict[str, Any]:
        """Stages 5, 10, 11 for one plan: decode and preprocess images, collate."""
        faults = list(plan["faults"])
        rows: list[Row] = []
        for row in plan["rows"]:
            kept = []
            for doc in row:
                try:
                    doc.pixel_values = self.load_pixels(doc, reader)
                    kept.append(doc)
                except SampleFault as fault:
                    faults.append([fault.reason, doc.location[0], doc.key, fault.detail])
            if kept:
                rows.append(kept)
        meta = {"state": plan["state"], "epoch": plan["epoch"], "faults": faults, "good": sum(map(len, rows))}
        if not rows:
            return {"_loader": {**meta, "empty": True}}
        batch = self.form.collate(rows, self.preprocess.stack)
        batch["_loader"] = {**meta, "empty": False}
        return batch

    def load_pixels(self, doc: TokenizedSample, reader: ShardReader) -> list[Any]:
        url, group = doc.location
        members = reader.read(url, group, [image.member for image in doc.images])
        pixels = []
        planned, doc.image_sizes, doc.image_grid_thw = doc.image_sizes, [], []
        for image in doc.images:
            decoded = decode_image(
                members[image.member],
                doc.key,
                image.member,
                self.settings.rules.max_image_pixels,
                self.preprocess.draft_size,
            )
            prepared, grid_thw = self.preprocess.prepare_with_grid(decoded)
            pixels.append(prepared)
            doc.image_sizes.append((decoded.height, decoded.width))
            if grid_thw is not None:
                doc.image_grid_thw.append(grid_thw)
        if self.image_tokens is not None:  # the runs were planned from the headers: decoding must agree
            check_image_runs(doc, planned, self.decoded_counts(doc))
        return pixels

    def decoded_counts(self, doc: TokenizedSample) -> list[int]:
        """Each decoded image's visual tokens: from its `image_grid_thw` where the processor gives one (Qwen's
        native resolution), else from its size."""
        if doc.image_grid_thw:
            return [self.preprocess.processor.visual_tokens(grid) for grid in doc.image_grid_thw]
        return [self.image_tokens(size) for size in doc.image_sizes]


# ── the main-process loader: ranks in step, faults, state ─────────────────────────────────────
class StreamingLoader:
    """Iterator of batches for one rank, with state_dict() / load_state_dict() and fault counts."""

    def __init__(self, stream: SampleStream, sync: Callable[[bool], bool] | None = None) -> None:
        self.stream = stream
        self.settings = stream.settings
        # sync(flag) -> whether every rank's flag is true (an all-reduce MIN); None on one rank.
        self.sync = sync
        self.epoch = 0
        self.planner_state: dict[str, Any] | None = None
        self.faults: Counter = Counter()
        self.faults_by_epoch: dict[int, Counter] = {}  # for reports and tests; not part of the state
        self.needed_lengths: list[int] = []  # tokens each nothing_learned sample needed (for the message)
        self.good = 0
        self.dropped = 0
        self.batches_taken = 0
        self._batches: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> StreamingLoader:
        return self

    def _next_item(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The next non-empty batch from the stream and its metadata, faults counted."""
        if self._batches is None:
            self.stream.start_state = self.planner_state
            workers = self.settings.num_workers
            # An explicit generator: without one, creating the DataLoader draws from the global torch
            # RNG, so a resumed run's dropout would no longer match an uninterrupted one bit for bit.
            loader = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=workers,
                persistent_workers=workers > 0,
                generator=torch.Generator().manual_seed(self.settings.seed),
            )
            self._batches = iter(loader)
        while True:
            item = next(self._batches)
            meta = item.pop("_loader")
            self._account(meta)
            if not meta["empty"]:
                return item, meta
            self.planner_state = meta["state"]  # every sample of that plan was bad

    def _everyone_in_epoch(self, in_epoch: bool) -> bool:
        if self.sync is None or self.settings.epoch_mode != "epoch":
            return in_epoch
        return self.sync(in_epoch)

    def __next__(self) -> dict[str, Any]:
        item, meta = self._next_item()
        while True:
            in_epoch = meta["epoch"] == self.epoch
            if self._everyone_in_epoch(in_epoch):
                self.planner_state = meta["state"]
                self.batches_taken += 1
                return item
            # Some rank has finished the epoch. The others drop the rest of theirs, with no
            # collective meanwhile, so every rank starts the next epoch at the same batch.
            while meta["epoch"] == self.epoch:
                self.dropped += len(item["keys"])
                self.planner_state = meta["state"]
                item, meta = self._next_item()
            self.epoch = meta["epoch"]

    def _account(self, meta: dict[str, Any]) -> None:
        for reason, *rest in meta["faults"]:
            self.faults[reason] += 1
            self.faults_by_epoch.setdefault(meta["epoch"], Counter())[reason] += 1
            if reason == "nothing_learned":
                self.needed_lengths.append(rest[3])
        self.good += meta["good"]
        bad = sum(self.faults.values())
        seen = bad + self.good
        self._check_max_len(seen)
        limit = self.settings.max_bad_fraction
        if meta["faults"] and seen >= self.settings.bad_fraction_min_samples and bad > limit * seen:
            reason, url, key, detail = meta["faults"][-1][:4]
            raise DataQualityError(
                f"rank {self.stream.rank}: {bad} of {seen} samples are bad ({bad / seen:.1%}), over "
                f"data.max_bad_fraction={limit}; last: {reason} in shard {url}, key {key!r} ({detail}). "
                f"By reason: {dict(self.faults)}. Check the shards with `mtrain data validate`, "
                "or raise data.max_bad_fraction"
            )

    def _check_max_len(self, seen: int) -> None:
        """Stop early, naming the data.max_len the data needs, when most samples are cut to nothing.

        Checked from the first batch on (the planner skips such samples while filling it), so a
        max_len far too short stops the job before step 1 rather than after bad_fraction_min_samples.
        """
        cut = self.faults["nothing_learned"]
        too_few = seen < min(NOTHING_LEARNED_MIN_SAMPLES, self.settings.bad_fraction_min_samples)
        if too_few or 2 * cut <= seen or not self.needed_lengths:  # (lengths of a resumed run's past cuts are not kept)
            return
        lengths = sorted(self.needed_lengths)
        most = lengths[min(len(lengths) - 1, (9 * len(lengths)) // 10)]
        max_len = self.stream.spec.max_len
        raise DataQualityError(
            f"rank {self.stream.rank}: {cut} of {seen} samples keep no learned token within "
            f"data.max_len={max_len} (they need {lengths[0]}..{lengths[-1]} tokens). The data needs "
            f"data.max_len={lengths[-1]} (every sample seen fits) or at least {most} (90% of those cut fit); "
            "or shorten the samples (fewer images per sample, or fewer visual tokens per image)"
        )

    # ── metrics ───────────────────────────────────────────────────────────────────────────────
    def fault_counts(self, epoch: int | None = None) -> dict[str, int]:
        """Bad samples skipped by this rank so far (or in one epoch of this run), by reason."""
        return dict(self.faults if epoch is None else self.faults_by_epoch.get(epoch, Counter()))

    def metrics(self) -> dict[str, float]:
        """Counters with the same keys, in the same order, on every rank (so they can be summed)."""
        out = {f"data/bad/{reason}": float(self.faults.get(reason, 0)) for reason in FAULT_REASONS}
        out.update({"data/samples": float(self.good), "data/dropped": float(self.dropped)})
        return out

    # ── state ─────────────────────────────────────────────────────────────────────────────────
    def state_dict(self) -> dict[str, Any]:
        """This rank's position, JSON-serialisable."""
        planner = self.planner_state
        if planner is None:
            planner = initial_state(self.settings, self.stream.rank, self.stream.world_size)
        return {
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
            "epoch": self.epoch,
            "planner": planner,
            "faults": dict(self.faults),
            "good": self.good,
            "dropped": self.dropped,
            "batches_taken": self.batches_taken,
            "order_version": ORDER_VERSION,
        }

    def load_state_dict(self, all_ranks: list[dict[str, Any]]) -> None:
        """Restore this rank from every rank's saved state (index = saved rank), re-partitioning
        when the world size changed so that no sample of the epoch is lost or repeated."""
        if self._batches is not None:
            raise RuntimeError("load the loader state before taking the first batch")
        check_saved_states(all_ranks)
        warn_if_order_changed(all_ranks)
        rank, world_size = self.stream.rank, self.stream.world_size
        if len(all_ranks) == world_size:
            own = all_ranks[rank]
            self.planner_state = own["planner"]
            self.faults = Counter(own["faults"])
            self.good, self.dropped = own["good"], own["dropped"]
            self.epoch, self.batches_taken = own["epoch"], own["batches_taken"]
            return
        self.planner_state = self._repartitioned(all_ranks)
        mine = [s for s in all_ranks if s["rank"] % world_size == rank]  # counters: old rank r -> r % W
        self.faults = sum((Counter(s["faults"]) for s in mine), Counter())
        self.good = sum(s["good"] for s in mine)
        self.dropped = sum(s["dropped"] for s in mine)
        self.epoch = min(s["epoch"] for s in all_ranks)
        self.batches_taken = max(s["batches_taken"] for s in all_ranks)

    def _repartitioned(self, all_ranks: list[dict[str, Any]]) -> dict[str, Any]:
        rank, world_size = self.stream.rank, self.stream.world_size
        planners = [s["planner"] for s in all_ranks]
        planner = self.stream.planner(ShardReader(cache=self.stream.cache))
        cursors = []
        for source in range(len(self.settings.sources)):
            old = [p["cursors"][source] for p in planners]
            if self.settings.epoch_mode == "resampled":
                cursors.append(dict(old[rank]) if rank < len(old) else {"draws": 0})
                continue
            leftovers = [
                [pos for src, epoch, pos in p["pending"] if src == source and epoch == p["cursors"][source]["epoch"]]
                for p in planners
            ]
            cursors.append(repartition(old, leftovers, rank, world_size, planner.totals[source]))
        draws = planners[rank]["draws"] if rank < len(planners) else 0
        return {"epoch": cursors[0].get("epoch", 0), "cursors": cursors, "draws": draws, "pending": []}


STATE_KEYS = ("rank", "world_size", "epoch", "planner", "faults", "good", "dropped", "batches_taken")


def warn_if_order_changed(all_ranks: list[dict[str, Any]]) -> None:
    """A data position saved under another epoch-order rule resumes, but not exactly: say so."""
    saved = {state.get("order_version", 1) for state in all_ranks}
    if saved != {ORDER_VERSION}:
        warnings.warn(
            f"the checkpoint's data position was saved under epoch-order rule {sorted(saved)}, and this mtrain "
            f"orders epochs by rule {ORDER_VERSION}: the rest of the current epoch follows the new order, so "
            "some of its samples may be seen twice or not at all (later epochs are exact). Finish the epoch "
            "with the mtrain version that wrote the checkpoint if that matters",
            stacklevel=2,
        )


def check_saved_states(all_ranks: list[dict[str, Any]]) -> None:
    """Refuse, with the way out, a data position this loader did not write (a KeyError otherwise)."""
    for index, saved in enumerate(all_ranks):
        missing = [key for key in STATE_KEYS if key not in saved]
        if missing:
            raise ValueError(
                f"the checkpoint's data position (saved rank {index}: {sorted(saved)}) lacks {', '.join(missing)}: "
                "an older loader wrote it (the removed `replay_stream` pair loader kept only a batch count), and "
                "this loader cannot tell which samples it had delivered. Start a new run from the checkpoint's "
                "weights with `checkpoint.init_from=CHECKPOINT_FOLDER` (fresh data order, optimizer and "
                "schedule), or finish the run with the mtrain version that wrote it"
            )


def torch_distributed_sync() -> Callable[[bool], bool] | None:
    """An all-reduce MIN over the default process group, or None when there is no group to sync."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"

    def everyone(flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    return everyone


def torch_distributed_gather() -> Callable[[Any], list[Any]] | None:
    """An all_gather_object over the default process group, or None when there is no group."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None

    def gather(value: Any) -> list[Any]:
        values: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values

    return gather


def build_loader(
    settings: LoaderSettings,
    rank: int,
    world_size: int,
    spec: TokenSpec,
    image_processor: Any,
    visual_tokens: VisualTokens,
    sync: Callable[[bool], bool] | None = None,
    gather: Callable[[Any], list[Any]] | None = None,
    form: SampleForm | None = None,
    image_tokens: ImageTokens | None = None,
) -> StreamingLoader:
    """The loader for one rank: shard lists and counts (in SampleStream), then the stages wired.

    `gather` (every rank's value, from an all-gather; see `torch_distributed_gather`) lets the ranks
    share the scans of shards that no index.json counts; every rank must then build its loader.
    `form` makes other batches than documents (pairs.PairForm); the default is DocumentForm."""
    stream = SampleStream(settings, rank, world_size, spec, image_processor, visual_tokens, gather, form, image_tokens)
    return StreamingLoader(stream, sync)
