"""Preflight's agreement and parameter checks across 2 real gloo ranks (torchrun), and its messages."""

from __future__ import annotations

import json

import pytest

from mtrain.launch.env import WorldInfo
from mtrain.launch.preflight import disagreements, rendezvous_failure
from tests.conftest import REPO, run, torchrun

pytestmark = pytest.mark.timeout(180)


def test_preflight_checks_on_two_ranks(tmp_path):
    proc = run(
        [
            *torchrun(),
            str(REPO / "tests/distributed/preflight_worker.py"),
            str(tmp_path),
        ],
        cwd=tmp_path,
        timeout=150,
    )
    assert proc.returncode == 0
    results = {}
    for rank in (0, 1):
        for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            results[record["case"], record["rank"]] = record["error"]
    assert len(results) == 10, results

    for rank in (0, 1):
        assert results["agree", rank] is None
        assert results["params_equal", rank] is None
        # Every rank fails the same way, so none is left waiting in a collective.
        config = results["config", rank]
        assert "config_hash: rank 0" in config and "rank 1" in config and "'hash-1'" in config
        differ = results["params_differ", rank]
        assert "1.bias differs on rank(s) [1]" in differ and "0.weight" not in differ
        layout = results["layout", rank]
        assert "1.weight differs on rank(s) [1]" in layout and "1.bias differs" in layout


def test_disagreements_lists_each_field_and_rank():
    records = [
        {"rank": r, "host": f"n{r // 2}", "config_hash": "a", "world_size": 4, "mtrain_version": "0.1.0"}
        for r in range(4)
    ]
    assert disagreements(records) == []
    records[3]["config_hash"] = "b"
    records[2]["world_size"] = 2
    problems = disagreements(records)
    assert problems == [
        "config_hash: rank 0 (n0) has 'a'; rank 3 (n1) has 'b'",
        "world_size: rank 0 (n0) has 4; rank 2 (n1) has 2",
    ]


def test_rendezvous_failure_names_address_ranks_and_knob():
    rank0 = WorldInfo(0, 2, 0, 1, "10.0.0.1", 29400, "slurm")
    message = str(rendezvous_failure(TimeoutError("Timed out after 21 seconds"), rank0, 20))
    assert "rank 0 waited 20 s at 10.0.0.1:29400 for the other 1 rank(s)" in message
    assert "dist.init_timeout_s=20" in message and "MASTER_ADDR" in message
    rank1 = WorldInfo(1, 2, 0, 1, "10.0.0.1", 29400, "slurm")
    assert "rank 1 could not reach rank 0 at 10.0.0.1:29400" in str(rendezvous_failure(OSError(), rank1, 20))
