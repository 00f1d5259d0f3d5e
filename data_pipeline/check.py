"""`mtrain data inspect` and `mtrain data validate`: look at shards, and find every bad member."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from data_pipeline.formats import (
    ImageSegment,
    Sample,
    SampleFault,
    SampleRules,
    TextSegment,
    build_sample,
    load_images,
    with_source,
)
from data_pipeline.shards import ShardReader


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
    samples: int = 0
    forms: Counter = field(default_factory=Counter)
    images_per_sample: Counter = field(default_factory=Counter)
    token_lengths: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    first_sample: Sample | None = None


def walk_shards(
    urls: list[str], rules: SampleRules, decode_images: bool = True
) -> tuple[ShardSummary, list[tuple[str, Sample]]]:
    """Read every group of every shard; collect samples and every problem with shard and key."""
    reader = ShardReader()
    summary = ShardSummary()
    samples: list[tuple[str, Sample]] = []
    for url in urls:
        for group in reader.scan(url).groups:
            if group.fault is not None:
                summary.problems.append(Problem(url, group.key, *group.fault))
                continue
            sample = None
            try:
                members = reader.read(url, group)
                sample = build_sample(group.key, members, rules)
                if decode_images:
                    load_images(sample, members, rules)
            except SampleFault as fault:
                fault = with_source(fault, sample.source) if sample is not None else fault
                summary.problems.append(Problem(url, group.key, fault.reason, fault.detail))
                continue
            summary.samples += 1
            summary.forms[sample.form] += 1
            summary.images_per_sample[len(sample.images)] += 1
            samples.append((url, sample))
            summary.first_sample = summary.first_sample or sample
    return summary, samples


def validate_shards(urls: list[str], rules: SampleRules) -> list[Problem]:
    """Every bad member or sample, by shard, key and reason (images fully decoded)."""
    summary, _ = walk_shards(urls, rules)
    return summary.problems


def sample_token_length(sample: Sample, count_tokens: Callable[[str], int], visual_tokens: int) -> int:
    return sum(visual_tokens if isinstance(s, ImageSegment) else count_tokens(s.text) for s in sample.segments)


def render_sample(sample: Sample) -> str:
    """One sample as text: images as [image member WxH], learned text in «guillemets»."""
    parts = [f"key={sample.key} form={sample.form}"]
    for segment in sample.segments:
        if isinstance(segment, TextSegment):
            parts.append(f"«{segment.text}»" if segment.learned else segment.text)
        else:
            size = f" {segment.image.width}x{segment.image.height}" if segment.image is not None else ""
            parts.append(f"[image {segment.member}{size}]")
    return "".join(parts[:1]) + "\n" + "".join(parts[1:])


def percentiles(values: list[int], points: tuple[int, ...] = (50, 90, 99, 100)) -> dict[int, int]:
    if not values:
        return {}
    ordered = sorted(values)
    return {p: ordered[min(len(ordered) - 1, (len(ordered) * p) // 100)] for p in points}


def inspect_report(urls: list[str], rules: SampleRules, count_tokens: Callable[[str], int], visual_tokens: int) -> str:
    """Counts, the images-per-sample histogram, token-length percentiles and one rendered sample."""
    summary, samples = walk_shards(urls, rules)
    lengths = [sample_token_length(s, count_tokens, visual_tokens) for _, s in samples]
    lines = [
        f"shards: {len(urls)}  samples: {summary.samples}  bad: {len(summary.problems)}",
        "forms: " + ", ".join(f"{form}={n}" for form, n in sorted(summary.forms.items())),
        "images per sample: " + ", ".join(f"{k}:{v}" for k, v in sorted(summary.images_per_sample.items())),
        f"token length ({visual_tokens} visual tokens per image): "
        + ", ".join(f"p{p}={v}" for p, v in percentiles(lengths).items()),
    ]
    if summary.problems:
        reasons = Counter(p.reason for p in summary.problems)
        lines.append("bad by reason: " + ", ".join(f"{r}={n}" for r, n in sorted(reasons.items())))
    if summary.first_sample is not None:
        lines += ["first sample:", render_sample(summary.first_sample)]
    return "\n".join(lines)
