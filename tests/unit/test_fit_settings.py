"""Settings that make real models fit and run long: offload and the two timeouts, checked at config time."""

from __future__ import annotations

import pytest

from mtrain.cli import main
from mtrain.config import ConfigError, load_config
from mtrain.config.deepspeed_json import deepspeed_config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["zero.offload_param=cpu"],
            r"zero.offload_param: cpu keeps parameters on the CPU .* zero.offload_optimizer=cpu",
        ),
        (
            ["zero.offload_param=cpu", "zero.offload_optimizer=cpu", "zero.stage=2"],
            r"zero.offload_param: needs zero.stage=3",
        ),
        (["zero.offload_optimizer=cpu", "zero.stage=0"], r"zero.offload_optimizer: needs ZeRO"),
        (["zero.offload_optimizer=nvme"], r"zero.offload_optimizer: 'nvme' is not one of"),
        (["dist.collective_timeout_s=0"], r"dist.collective_timeout_s: must be at least 1 second"),
    ],
)
def test_bad_combinations_fail_when_the_config_is_built(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_offload_fails_in_mtrain_train_before_any_process_group(capsys):
    # `mtrain train` validates first: the error comes back without a rendezvous (which would hang here).
    assert main(["train", "configs/tiny.yaml", "zero.offload_param=cpu"]) != 0
    assert "zero.offload_param" in capsys.readouterr().err


def test_offload_reaches_the_deepspeed_json():
    cfg = load_config(None, ["zero.offload_optimizer=cpu", "zero.offload_param=cpu"])
    zero = deepspeed_config(cfg, world_size=2, precision="bf16")["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    plain = deepspeed_config(load_config(None, []), world_size=2, precision="bf16")["zero_optimization"]
    assert "offload_optimizer" not in plain and "offload_param" not in plain


def test_collective_timeout_is_long_by_default_and_apart_from_the_rendezvous():
    dist = load_config(None, []).dist
    assert (dist.init_timeout_s, dist.collective_timeout_s) == (300, 3600)
