"""Rank-0 work longer than the collective timeout: the other rank gets its result or error, no watchdog fires."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, run, torchrun

pytestmark = pytest.mark.timeout(180)


def test_rank0_work_outlasts_the_collective_timeout_and_hands_back_result_and_error(tmp_path):
    cmd = [
        *torchrun(),
        str(REPO / "tests/distributed/main_work_ranks.py"),
    ]
    proc = run(cmd, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0
