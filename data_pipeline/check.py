"""`mtrain data inspect` and `mtrain data validate`: look at shards, and find every bad member.

Both stream: one shard at a time, one sample at a time, images decoded and dropped, token lengths
kept as a histogram, so memory does not grow with the number of shards or samples. They read
every form the loader reads, and pair shards (`key.query.*`, `key.positive.*`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from data_pipeline.formats import (
    ImageSegment,
    Sample,
    SampleFault,
    SampleRules,
    TextSegment,
    build_sample,
    decode_image,
    decode_text,
    is_image_member,
    load_images,
    open_image,
    with_source,
)
from data_pipeline.shards import ShardCache, ShardReader

PAIR_SIDES = ("query", "positive")  # required; a `negative` side (hard negative) is optional


@dataclass(frozen=True)
class Problem:
    shard: str
    key: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.shard}\t{self.key}\t{self.reason}\t{self.detail}"


@dataclass
class ShardSummary:
    shards: int = 0
    samples: int = 0
    forms: Counter = field(default_factory=Counter)
    images_per_sample: Counter = field(default_factory=Counter)
    token_lengths: Counter = field(default_factory=Counter)  # length -> samples: bounded, exact percentiles
    problems: Counter = field(default_factory=Counter)  # reason -> count
    first_sample: Sample | None = None


def is_pair(members: dict[str, bytes]) -> bool:
    return any(ext.split(".", 1)[0] in PAIR_SIDES for ext in members)


def build_pair(key: str, members: dict[str, bytes], rules: SampleRules) -> Sample:
    """A pair shard's group as one Sample (query side, then positive side), checked as the pair
    reader needs it: each side an image or a text."""
    segments: list[TextSegment | ImageSegment] = []
    for side in (*PAIR_SIDES, "negative", "instruction"):
        side_members = sorted(ext for ext in members if ext.split(".", 1)[0] == side)
        if side in PAIR_SIDES and not side_members:
            raise SampleFault("missing_image", f"pair {key} has no {side} (neither {side}.jpg nor {side}.txt)")
        for ext in side_members:
            if is_image_member(ext):
                segments.append(ImageSegment(ext))
            elif ext.endswith(("txt", "text")):
                segments.append(TextSegment(decode_text(members[ext], key, ext), learned=False))
    return Sample(key, "pair", segments)


def iter_samples(
    urls: list[str],
    rules: SampleRules,
    decode_images: bool = True,
    cache: ShardCache | None = None,
    tokenize: Callable[[Sample, dict[str, tuple[int, int]]], object] | None = None,
) -> Iterator[tuple[str, Sample | None, Problem | None]]:
    """(shard, sample, None) or (shard, None, problem) for every group of every shard, in order.
    One shard's reader at a time; decoded images are dropped once checked. `tokenize` (a training
    config's tokenizing, which raises SampleFault: nothing learned within max_len, no image left)
    is applied to every sample that is not a pair, with its images' (height, width) from their headers
    (what training counts images of their own sizes by)."""
    for url in urls:
        reader = ShardReader(max_open=1, cache=cache)
        for group in reader.scan(url).groups:
            if group.fault is not None:
                yield url, None, Problem(url, group.key, *group.fault)
                continue
            sample = None
            try:
                members = reader.read(url, group)
                if is_pair(members):
                    sample = build_pair(group.key, members, rules)
                    for image in sample.images:
                        decode_image(members[image.member], group.key, image.member, rules.max_image_pixels)
                else:
                    sample = build_sample(group.key, members, rules)
                    if tokenize is not None:
                        tokenize(sample, header_sizes(sample, members, rules))
                    if decode_images:
                        load_images(sample, members, rules)
            except SampleFault as fault:
                fault = with_source(fault, sample.source) if sample is not None else fault
                yield url, None, Problem(url, group.key, fault.reason, fault.detail)
                continue
            yield url, sample, None
            for image in sample.images:
                image.image = None  # keep the pixels of no sample past its check
        reader.close()


def header_sizes(sample: Sample, members: dict[str, bytes], rules: SampleRules) -> dict[str, tuple[int, int]]:
    """(height, width) of each image of a sample, from its header (no pixel decoded), by member."""
    sizes = {}
    for image in sample.images:
        opened = open_image(members[image.member], sample.key, image.member, rules.max_image_pixels)
        sizes[image.member] = (opened.height, opened.width)
    return sizes


def iter_problems(
    urls: list[str],
    rules: SampleRules,
    cache: ShardCache | None = None,
    tokenize: Callable[[Sample, dict[str, tuple[int, int]]], object] | None = None,
) -> Iterator[Problem]:
    """Every bad member or sample, by shard, key and reason (images fully decoded), as found;
    with `tokenize`, also every sample that training would drop when tokenizing it."""
    for _, _, problem in iter_samples(urls, rules, cache=cache, tokenize=tokenize):
        if problem is not None:
            yield problem


def validate_shards(urls: list[str], rules: SampleRules, cache: ShardCache | None = None) -> list[Problem]:
    return list(iter_problems(urls, rules, cache))


def sample_token_length(sample: Sample, count_tokens: Callable[[str], int], visual_tokens: int) -> int:
    return sum(visual_tokens if isinstance(s, ImageSegment) else count_tokens(s.text) for s in sample.segments)


def render_sample(sample: Sample) -> str:
    """One sample as text: images as [image member WxH], learned text in «guillemets»."""
    parts = [f"key={sample.key} form={sample.form}" + (f" source={sample.source}" if sample.source else "")]
    for segment in sample.segments:
        if isinstance(segment, TextSegment):
            parts.append(f"«{segment.text}»" if segment.learned else segment.text)
        else:
            size = f" {segment.image.width}x{segment.image.height}" if segment.image is not None else ""
            parts.append(f"[image {segment.member}{size}]")
    return "".join(parts[:1]) + "\n" + "".join(parts[1:])


def percentiles(histogram: Counter, points: tuple[int, ...] = (50, 90, 99, 100)) -> dict[int, int]:
    """Exact percentiles of a {value: count} histogram."""
    total = sum(histogram.values())
    if not total:
        return {}
    out, seen, values = {}, 0, sorted(histogram.items())
    targets = {p: min(total - 1, (total * p) // 100) for p in points}
    for value, count in values:
        for p, rank in targets.items():
            if p not in out and rank < seen + count:
                out[p] = value
        seen += count
    return {p: out[p] for p in points}


def summarise(
    urls: list[str],
    rules: SampleRules,
    count_tokens: Callable[[str], int],
    visual_tokens: int,
    cache: ShardCache | None = None,
) -> ShardSummary:
    summary = ShardSummary(shards=len(urls))
    for _, sample, problem in iter_samples(urls, rules, cache=cache):
        if problem is not None:
            summary.problems[problem.reason] += 1
            continue
        summary.samples += 1
        summary.forms[sample.form] += 1
        summary.images_per_sample[len(sample.images)] += 1
        summary.token_lengths[sample_token_length(sample, count_tokens, visual_tokens)] += 1
        if summary.first_sample is None:  # a copy: the stream drops the pixels it decoded
            segments = [ImageSegment(s.member, s.image) if isinstance(s, ImageSegment) else s for s in sample.segments]
            summary.first_sample = Sample(sample.key, sample.form, segments, sample.turn_ends, sample.source)
    return summary


def inspect_report(
    urls: list[str],
    rules: SampleRules,
    count_tokens: Callable[[str], int],
    visual_tokens: int,
    max_len: int | None = None,
    cache: ShardCache | None = None,
) -> str:
    """Counts, the images-per-sample histogram, token-length percentiles (and how many samples
    exceed `max_len`) and one rendered sample."""
    summary = summarise(urls, rules, count_tokens, visual_tokens, cache)
    lines = [
        f"shards: {summary.shards}  samples: {summary.samples}  bad: {sum(summary.problems.values())}",
        "forms: " + ", ".join(f"{form}={n}" for form, n in sorted(summary.forms.items())),
        "images per sample: " + ", ".join(f"{k}:{v}" for k, v in sorted(summary.images_per_sample.items())),
        f"token length ({visual_tokens} visual tokens per image): "
        + ", ".join(f"p{p}={v}" for p, v in percentiles(summary.token_lengths).items()),
    ]
    if max_len is not None:
        over = sum(n for length, n in summary.token_lengths.items() if length > max_len)
        lines.append(
            f"over data.max_len={max_len}: {over} of {summary.samples} samples (cut, or dropped if nothing learned is left)"
        )
    if summary.problems:
        lines.append("bad by reason: " + ", ".join(f"{r}={n}" for r, n in sorted(summary.problems.items())))
    if summary.first_sample is not None:
        lines += ["first sample:", render_sample(summary.first_sample)]
    return "\n".join(lines)
