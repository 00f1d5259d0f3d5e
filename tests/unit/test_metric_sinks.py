"""The W&B sink (offline, read back from the run file it writes) and its missing-package error."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from mtrain.cli import main
from mtrain.metrics.sinks import WandbSink, require_wandb
from tests.conftest import REPO


def read_wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """History rows of an offline .wandb file: a LevelDB-style log (32 KiB blocks, 7-byte record
    headers, records split FIRST/MIDDLE/LAST) of wandb's own protobuf `Record` messages."""
    import json

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:16]
    block, position, pending, payloads = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            position += left  # block trailer or zero padding
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    history = {}
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            history[record.history.step.num] = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items
            }
    return history


def test_wandb_sink_offline_records_every_step(tmp_path):
    pytest.importorskip("wandb", reason="the 'wandb' extra is not installed: pip install 'mtrain[wandb]'")
    import wandb

    sink = WandbSink(tmp_path, "mtrain-test", "sink-test", "offline", {"run": {"name": "sink-test"}})
    try:
        for step in (1, 2, 3):
            sink.log(step, {"loss": 3.0 / step, "loss/scale_4": 4.0 / step, "tokens_per_s": 100.0 * step})
    finally:
        sink.close()
        wandb.teardown()  # stops W&B's background service: no process outlives the test
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history = read_wandb_history(run_file)
    assert sorted(history) == [1, 2, 3]
    for step, row in history.items():
        assert row["loss"] == pytest.approx(3.0 / step)
        assert row["loss/scale_4"] == pytest.approx(4.0 / step)
        assert row["tokens_per_s"] == pytest.approx(100.0 * step)


def test_missing_wandb_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a package as not importable
    with pytest.raises(ValueError, match=r"pip install 'mtrain\[wandb\]'"):
        require_wandb()
    # `mtrain train` refuses before any process group or model is built.
    assert main(["train", str(REPO / "configs/tiny.yaml"), "logging.wandb=true"]) == 2
    assert "logging.wandb=true needs the wandb package" in capsys.readouterr().err
