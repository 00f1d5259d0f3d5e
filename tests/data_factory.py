"""Tiny real inputs and shards of every form, and shards holding every kind of bad data."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import webdataset as wds
from PIL import Image

from data_pipeline.sample_data import COLOURS, SHAPES, draw_shape


def jpeg_bytes(rng: random.Random, size: int = 48, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    draw_shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng, size).save(buffer, format=fmt)
    return buffer.getvalue()


def write_inputs(root: Path, count: int = 6, seed: int = 0) -> dict[str, Path]:
    """OBELICS JSONL, LLaVA JSON + image folder, caption folder and caption CSV under `root`."""
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(count):
        (images / f"img{i}.jpg").write_bytes(jpeg_bytes(rng))
    (images / "legacy.bmp").write_bytes(jpeg_bytes(rng, fmt="BMP"))
    docs = []
    for i in range(count):
        docs.append(
            {
                "texts": [f"document {i} starts.", None, "and it ends."],
                "images": [None, f"images/img{i}.jpg", None],
                "metadata": {"n": i},
            }
        )
    docs.append({"texts": ["bmp doc", None], "images": [None, "images/legacy.bmp"]})
    docs.append({"texts": ["broken", None], "images": [None, "images/missing.jpg"]})
    (root / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    llava = [
        {
            "id": f"c{i}",
            "image": f"img{i}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": f"shape {i}"},
            ],
        }
        for i in range(count)
    ]
    (root / "llava.json").write_text(json.dumps(llava))
    captions = root / "captions"
    captions.mkdir()
    for i in range(count):
        (captions / f"p{i}.jpg").write_bytes((images / f"img{i}.jpg").read_bytes())
        (captions / f"p{i}.txt").write_text(f"a picture {i}.")
    (root / "captions.csv").write_text(
        "image,caption\n" + "".join(f"images/img{i}.jpg,caption {i}\n" for i in range(count))
    )
    return {
        "interleaved": root / "docs.jsonl",
        "conversation": root / "llava.json",
        "caption": captions,
        "caption_csv": root / "captions.csv",
        "images": images,
    }


def caption_shard(path: Path, keys: list[str], rng: random.Random, words: int = 1) -> None:
    with wds.TarWriter(str(path)) as writer:
        for key in keys:
            writer.write({"__key__": key, "jpg": jpeg_bytes(rng, 40), "txt": " ".join(["a red circle."] * words)})


def add_raw_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_bad_shards(out: Path, seed: int = 0, pairs: bool = False) -> dict[str, object]:
    """Shards holding every bad case next to good samples; returns expected keys and counts.

    With `pairs`, the same cases in the pair form (query image, positive text); the samples
    that lack a query or a positive there (the JSON ones, the text-only one) count as `missing_image`,
    as `mtrain data validate` counts them."""
    rng = random.Random(seed)
    jpg, png, txt = ("query.jpg", "query.png", "positive.txt") if pairs else ("jpg", "png", "txt")
    out.mkdir(parents=True, exist_ok=True)
    good: list[str] = []
    expected: dict[str, int] = {}

    def good_caption(tar: tarfile.TarFile, key: str) -> None:
        add_raw_member(tar, f"{key}.{jpg}", jpeg_bytes(rng, 40))
        add_raw_member(tar, f"{key}.{txt}", b"a blue square.")
        good.append(key)

    def bump(reason: str, pair_reason: str | None = None) -> None:
        reason = pair_reason if pairs and pair_reason else reason
        expected[reason] = expected.get(reason, 0) + 1

    marker = out / "PICKLE_RAN"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."  # pickle protocol 0: os.system(...)
    with tarfile.open(out / "bad-000000.tar", "w") as tar:
        good_caption(tar, "g000")
        add_raw_member(tar, f"b_corrupt.{jpg}", b"\xff\xd8\xff\xe0 this is not a jpeg")
        add_raw_member(tar, f"b_corrupt.{txt}", b"a red circle.")
        bump("corrupt_image")
        good_caption(tar, "g001")
        add_raw_member(tar, "b_json.json", b"{not json")
        add_raw_member(tar, "b_json.0.jpg", jpeg_bytes(rng, 40))
        bump("malformed_json", "missing_image")
        add_raw_member(tar, "b_missing.json", json.dumps({"texts": ["x", None], "images": [None, "0.jpg"]}).encode())
        bump("missing_image", "missing_image")
        good_caption(tar, "g002")
        add_raw_member(tar, f"g000.{jpg}", jpeg_bytes(rng, 40))  # the key g000 again, later in the shard
        add_raw_member(tar, f"g000.{txt}", b"a duplicate.")
        bump("duplicate_key")
        add_raw_member(tar, "../escape.txt", b"outside")
        bump("unsafe_path")
        add_raw_member(tar, "/abs/path.txt", b"absolute")
        bump("unsafe_path")
        big = io.BytesIO()
        Image.new("RGB", (300, 300), (1, 2, 3)).save(big, format="PNG")
        add_raw_member(tar, f"b_big.{png}", big.getvalue())
        add_raw_member(tar, f"b_big.{txt}", b"too many pixels.")
        bump("oversize_image")
        add_raw_member(tar, "b_notext.json", json.dumps({"texts": [None], "images": ["0.jpg"]}).encode())
        add_raw_member(tar, "b_notext.0.jpg", jpeg_bytes(rng, 40))
        bump("no_text", "missing_image")
        add_raw_member(
            tar, f"b_noimage.{txt}", b"a caption of no image."
        )  # text-only documents are fine; captions are not; a pair needs its query
        bump("no_image", "missing_image")
        good_caption(tar, "g003")
        add_raw_member(tar, "b_pickle.pyd", payload)
        add_raw_member(tar, "b_pickle.pickle", payload)
        add_raw_member(tar, f"b_pickle.{txt}", b"a sample whose extra members are pickles.")
        add_raw_member(tar, f"b_pickle.{jpg}", jpeg_bytes(rng, 40))
        good.append("b_pickle")  # a good caption pair: the pickles are ignored, never loaded
        good_caption(tar, "g004")
    # An empty shard, and a truncated one (cut in the middle of its third sample).
    with tarfile.open(out / "bad-000001.tar", "w"):
        pass
    bump("empty_shard")
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        for key in ("t000", "t001", "t002"):
            add_raw_member(tar, f"{key}.{jpg}", jpeg_bytes(rng, 40))
            add_raw_member(tar, f"{key}.{txt}", b"a green cross.")
    data = full.getvalue()
    offsets = [m.offset for m in tarfile.open(fileobj=io.BytesIO(data)).getmembers()]
    (out / "bad-000002.tar").write_bytes(data[: offsets[4] + 700])  # t002.jpg header + part of its data
    good += ["t000", "t001"]
    bump("truncated_tar")
    with tarfile.open(out / "bad-000003.tar", "w") as tar:
        for i in range(5, 12):
            good_caption(tar, f"g{i:03d}")
    return {"good": good, "faults": expected, "marker": marker, "pattern": str(out / "bad-{000000..000003}.tar")}


def make_loader(
    patterns: str | list[tuple[str, float]],
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 4,
    max_len: int = 96,
    visual_tokens: int = 64,
    image_size: int = 32,
    sync=None,
    gather=None,
    pairs: bool = False,
    tokenizer=None,
    processor=None,
    **settings,
):
    """A real StreamingLoader over real shards with the tiny tokenizer and image processor (or the
    given ones, another preset's); with `pairs`, of (query, positive[, negative]) pair batches."""
    from data_pipeline.loader import LoaderSettings, build_loader
    from data_pipeline.tokenize import TokenSpec
    from mtrain.model.build import tiny_image_processor
    from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer

    tokenizer = tokenizer or build_tiny_tokenizer()
    sources = ((patterns, 1.0),) if isinstance(patterns, str) else tuple(patterns)
    loader_settings = LoaderSettings(sources=sources, batch_size=batch_size, seed=0, **settings)
    spec = TokenSpec(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), max_len)
    processor = processor or tiny_image_processor(image_size)
    form = None
    if pairs:
        from data_pipeline.pairs import PairForm, PairSpec

        form = PairForm(PairSpec(tokenizer, spec.image_token_id, visual_tokens, max_len, image_size))
    return build_loader(loader_settings, rank, world_size, spec, processor, visual_tokens, sync, gather, form)


WORDS = "the a red green blue circle square triangle cross shape small large image shows of and is".split()


def write_mixed_shards(out: Path, docs_per_shard: list[int], seed: int = 0, max_words: int = 120) -> str:
    """Interleaved documents, caption pairs and conversations of varied lengths (a realistic mix)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)) + "."

    for shard, count in enumerate(docs_per_shard):
        with wds.TarWriter(str(out / f"mix-{shard:06d}.tar")) as writer:
            for i in range(count):
                key = f"m{shard:03d}_{i:05d}"
                kind = i % 3
                length = max(2, int(rng.lognormvariate(3.0, 0.8)) % max_words)
                if kind == 0:
                    n_images = rng.randint(1, 3)
                    texts, images, sample = [], [], {"__key__": key}
                    for j in range(n_images):
                        texts += [words(rng.randint(2, length)), None]
                        images += [None, f"{j}.jpg"]
                        sample[f"{j}.jpg"] = jpeg_bytes(rng, 24)
                    sample["json"] = json.dumps({"texts": texts, "images": images, "metadata": {}})
                elif kind == 1:
                    sample = {"__key__": key, "jpg": jpeg_bytes(rng, 24), "txt": words(length)}
                else:
                    turns = [
                        {"from": "human", "value": "<image>\n" + words(3)},
                        {"from": "gpt", "value": words(length)},
                    ]
                    if rng.random() < 0.5:
                        turns += [{"from": "human", "value": words(4)}, {"from": "gpt", "value": words(5)}]
                    sample = {"__key__": key, "jpg": jpeg_bytes(rng, 24), "json": json.dumps({"conversations": turns})}
                writer.write(sample)
    return str(out / f"mix-{{000000..{len(docs_per_shard) - 1:06d}}}.tar")


def write_mixed_modality_shard(path: Path, count: int = 32, text_only_every: int = 4) -> dict[str, bool]:
    """Conversations and documents, every `text_only_every`-th one without an image; key -> has an image."""
    rng = random.Random(0)
    has_image = {}
    with wds.TarWriter(str(path)) as writer:
        for i in range(count):
            key, with_image = f"t{i:03d}", i % text_only_every != 0
            if i % 2:
                turns = [
                    {"from": "human", "value": ("<image>\n" if with_image else "") + "what is shown?"},
                    {"from": "gpt", "value": "a red circle."},
                ]
                sample = {"__key__": key, "json": json.dumps({"conversations": turns})}
            else:
                texts, images = (["a doc.", None], [None, "0.jpg"]) if with_image else (["only words."], [None])
                sample = {"__key__": key, "json": json.dumps({"texts": texts, "images": images})}
            if with_image:
                sample["0.jpg" if i % 2 == 0 else "jpg"] = jpeg_bytes(rng, 24)
            writer.write(sample)
            has_image[key] = with_image
    return has_image


def rest_of_epoch(loader) -> list[str]:
    """Sample keys of every batch until the loader's epoch ends (the first batch of the next is dropped)."""
    keys = []
    while True:
        batch = next(loader)
        if loader.epoch > 0:
            return keys
        keys += batch["keys"]
