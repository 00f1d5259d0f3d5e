"""Shards by glob, gzip, http://, pipe: and index.json: the same batches as local tars, and the
same bad-data accounting when a remote read breaks off."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import braceexpand
import pytest
import torch

from data_pipeline.shards import ShardCache, ShardReader, expand_shards, shard_counts, write_index
from tests.data_factory import make_loader
from tests.shard_server import serve_folder

SHARDS = [f"shard-{i:06d}.tar" for i in range(4)]


def batches(pattern: str, count: int = 3, **settings) -> list[dict]:
    loader = make_loader(pattern, **settings)
    return [next(loader) for _ in range(count)]


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    for a, b in zip(got, expected, strict=True):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


@pytest.fixture
def cache(tmp_path) -> ShardCache:
    return ShardCache(folder=str(tmp_path / "cache"), retries=1)


def gzip_copy(sample_shards: Path, out: Path) -> Path:
    out.mkdir()
    for name in SHARDS:
        with open(sample_shards / name, "rb") as src, gzip.open(out / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def test_globs_expand_sorted_and_a_glob_matching_nothing_is_an_error(sample_shards, shards_pattern):
    assert expand_shards(str(sample_shards / "shard-*.tar")) == expand_shards(shards_pattern)
    assert expand_shards(f"{sample_shards}/shard-00000[23].tar::http://h/x-{{0..1}}.tar") == [
        str(sample_shards / "shard-000002.tar"),
        str(sample_shards / "shard-000003.tar"),
        "http://h/x-0.tar",
        "http://h/x-1.tar",
    ]
    # The fast path for one numeric range expands exactly as braceexpand does.
    for pattern in ("a-{000000..000012}.tar", "x{1..12}", "x{01..3}", "x{10..8}", "x{001..1000}", "x{1..010}"):
        assert expand_shards(f"http://h/{pattern}") == [f"http://h/{u}" for u in braceexpand.braceexpand(pattern)]
    with pytest.raises(ValueError, match="matches no file"):
        expand_shards(str(sample_shards / "nothing-*.tar"))


def test_gzipped_http_and_pipe_shards_give_the_same_batches_as_local_tars(
    sample_shards, shards_pattern, tmp_path, cache
):
    expected = batches(shards_pattern)
    gz = gzip_copy(sample_shards, tmp_path / "gz")
    assert_same_batches(batches(str(gz / "shard-{000000..000003}.tar.gz"), cache=cache), expected)
    pipes = "::".join(f"pipe:cat {sample_shards / name}" for name in SHARDS)
    assert_same_batches(batches(pipes, cache=cache), expected)
    with serve_folder(sample_shards) as (url, requests):
        assert_same_batches(batches(f"{url}/shard-{{000000..000003}}.tar", cache=cache), expected)
        assert requests.count("index.json") == 1  # counts came from the index, fetched once
        assert sorted(set(requests) - {"index.json"}) == SHARDS and len(requests) == 5  # each shard copied once


def test_a_connection_dropped_mid_shard_is_retried_then_counted(sample_shards, tmp_path, cache):
    """The server cuts shard 1 off after 40% of its bytes, every time: the read is retried, then the
    samples that did arrive are delivered and the rest are counted as truncated_tar."""
    size = (sample_shards / SHARDS[1]).stat().st_size
    with serve_folder(sample_shards, drop_after={SHARDS[1]: int(size * 0.4)}) as (url, requests):
        loader = make_loader(f"{url}/shard-{{000000..000003}}.tar", cache=cache, max_bad_fraction=1.0)
        delivered = []
        while loader.epoch == 0:
            batch = next(loader)
            if loader.epoch == 0:
                delivered += batch["keys"]
        assert requests.count(SHARDS[1]) == cache.retries + 1
    broken = [k for k in delivered if k.startswith("s0001_")]
    counted = loader.fault_counts(0)
    assert 0 < len(broken) < 48 and set(counted) == {"truncated_tar"}
    assert len(broken) + counted["truncated_tar"] == 48  # every sample of the broken shard is in the ledger
    assert len(delivered) == 3 * 48 + len(broken) and len(set(delivered)) == len(delivered)


def test_a_connection_dropped_once_is_retried_and_nothing_is_lost(sample_shards, shards_pattern, cache):
    size = (sample_shards / SHARDS[1]).stat().st_size
    expected = batches(shards_pattern, count=12)
    with serve_folder(sample_shards, drop_after={SHARDS[1]: size // 3}, drop_times=1) as (url, requests):
        loader = make_loader(f"{url}/shard-{{000000..000003}}.tar", cache=cache)
        assert_same_batches([next(loader) for _ in range(12)], expected)
    assert requests.count(SHARDS[1]) == 2 and loader.fault_counts() == {}


def test_the_shard_cache_stays_under_its_limit_and_evicted_copies_are_fetched_again(
    sample_shards, shards_pattern, tmp_path
):
    shard_bytes = (sample_shards / SHARDS[0]).stat().st_size
    cache = ShardCache(folder=str(tmp_path / "small-cache"), retries=0, max_bytes=2 * shard_bytes)
    expected = batches(shards_pattern, count=30)
    with serve_folder(sample_shards) as (url, requests):
        loader = make_loader(f"{url}/shard-{{000000..000003}}.tar", cache=cache)
        got = [next(loader) for _ in range(30)]  # samples of all four shards interleave: copies come and go
    assert_same_batches(got, expected)
    assert len(list((tmp_path / "small-cache").glob("*.tar"))) <= 2  # evicted: readers keep what they hold open

    # A reader that closed its handle of an evicted copy copies the shard again, same bytes.
    cache = ShardCache(folder=str(tmp_path / "one-shard-cache"), retries=0, max_bytes=shard_bytes)
    with serve_folder(sample_shards) as (url, requests):
        reader = ShardReader(max_open=1, cache=cache)
        first, second = f"{url}/{SHARDS[0]}", f"{url}/{SHARDS[1]}"
        before = reader.read(first, reader.scan(first).groups[5])
        reader.read(second, reader.scan(second).groups[0])  # evicts the first copy, closes its handle
        assert reader.read(first, reader.scan(first).groups[5]) == before
    assert requests.count(SHARDS[0]) == 2


def test_counts_come_from_a_fresh_index_and_a_stale_one_is_detected(sample_shards, tmp_path, cache):
    folder = tmp_path / "shards"
    shutil.copytree(sample_shards, folder)
    urls = expand_shards(str(folder / "shard-*.tar"))
    write_index(folder, "caption", urls)
    assert shard_counts(urls, ShardReader(cache=cache)) == ([48] * 4, 0)  # no shard scanned

    # Shard 2 replaced after the index (written beside it and renamed, as tools do): the folder
    # changed, so every entry is checked, and shard 2's size no longer matches: it is scanned.
    half = (folder / SHARDS[2]).read_bytes()[: 24 * 5120]
    (folder / "tmp.tar").write_bytes(half)
    later = (folder / "index.json").stat().st_mtime + 10
    os.replace(folder / "tmp.tar", folder / SHARDS[2])
    os.utime(folder, (later, later))  # (a coarse filesystem clock may not have moved yet)
    counts, scanned = shard_counts(urls, ShardReader(cache=cache))
    assert scanned == 1 and counts[2] < 48 and counts[:2] == [48, 48] and counts[3] == 48

    # An index without sizes (older builds) is trusted only for shards not modified after it.
    index = json.loads((folder / "index.json").read_text())
    del index["bytes"]
    (folder / "index.json").write_text(json.dumps(index))
    os.utime(folder, (later + 10, later + 10))
    os.utime(folder / SHARDS[0], (later + 10, later + 10))
    assert shard_counts(urls, ShardReader(cache=cache))[1] >= 1  # shard 0 at least


def test_an_index_without_some_entries_scans_only_those_in_one_folder_or_several(sample_shards, tmp_path, cache):
    folder = tmp_path / "shards"
    shutil.copytree(sample_shards, folder)
    index = json.loads((folder / "index.json").read_text())
    del index["samples"][SHARDS[1]]
    index["samples"][SHARDS[3]] = "48"  # not a count: not trusted
    (folder / "index.json").write_text(json.dumps(index))
    os.utime(folder / "index.json", (folder.stat().st_mtime + 10,) * 2)  # the folder untouched since its index
    urls = expand_shards(str(folder / "shard-*.tar"))
    assert shard_counts(urls, ShardReader(cache=cache)) == ([48] * 4, 2)
    other = tmp_path / "other"
    shutil.copytree(sample_shards, other)
    os.unlink(other / "index.json")
    both = [urls[0], str(other / SHARDS[1]), urls[2]]
    assert shard_counts(both, ShardReader(cache=cache)) == ([48] * 3, 1)


def test_a_shard_cut_in_place_after_its_index_counts_what_it_lost(sample_shards, tmp_path, cache):
    """Truncated in place (the folder's mtime unchanged, so start-up trusts the entry): the loader
    still delivers every sample the shard holds and counts every one it lost."""
    folder = tmp_path / "shards"
    shutil.copytree(sample_shards, folder)
    with open(folder / SHARDS[2], "r+b") as handle:
        handle.truncate(handle.seek(0, 2) // 2)
    loader = make_loader(str(folder / "shard-*.tar"), cache=cache, max_bad_fraction=1.0)
    keys = []
    while loader.epoch == 0:
        batch = next(loader)
        keys += batch["keys"] if loader.epoch == 0 else []
    lost = loader.fault_counts(0)
    assert set(lost) == {"truncated_tar"} and len(keys) + lost["truncated_tar"] == 4 * 48
    assert 3 * 48 < len(keys) < 4 * 48 and len(set(keys)) == len(keys)


def test_a_remote_index_that_overstates_a_shard_counts_the_missing_samples(sample_shards, tmp_path, cache):
    folder = tmp_path / "shards"
    shutil.copytree(sample_shards, folder)
    index = json.loads((folder / "index.json").read_text())
    index["samples"][SHARDS[3]] = 50  # two samples more than the shard holds
    (folder / "index.json").write_text(json.dumps(index))
    with serve_folder(folder) as (url, _):
        loader = make_loader(f"{url}/shard-{{000000..000003}}.tar", cache=cache, max_bad_fraction=1.0)
        keys = []
        while loader.epoch == 0:
            batch = next(loader)
            keys += batch["keys"] if loader.epoch == 0 else []
    assert len(keys) == 4 * 48 and loader.fault_counts(0) == {"unreadable_shard": 2}


def test_fsspec_urls_are_read_through_fsspec(sample_shards, shards_pattern, cache):
    pytest.importorskip("fsspec")
    expected = batches(shards_pattern, count=2)
    assert_same_batches(batches(f"file://{sample_shards}/shard-{{000000..000003}}.tar", count=2, cache=cache), expected)
