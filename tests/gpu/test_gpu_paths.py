"""GPU-only switches: flash-attn, NCCL and bf16. Skipped on CPU machines (see conftest)."""

import pytest

from mtrain.config import load_config
from mtrain.engine.setup import resolve_placement
from mtrain.model.build import attention_implementation

pytestmark = pytest.mark.gpu


def test_auto_placement_is_cuda_bf16_nccl():
    placement = resolve_placement(load_config(None))
    assert (placement.device, placement.precision, placement.backend) == ("cuda", "bf16", "nccl")


def test_flash_attention_picked_when_installed():
    pytest.importorskip("flash_attn")
    assert attention_implementation("auto") == "flash_attention_2"
