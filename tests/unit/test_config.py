import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtrain.config import ConfigError, field_docs, load_config
from mtrain.config.deepspeed_json import BUCKET_FLOOR, deepspeed_config
from mtrain.config.schema import TrainConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_misspelled_nested_key_names_dotted_path_and_suggests(tmp_path):
    path = write(tmp_path, "model:\n  lora:\n    rnak: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.lora.rnak" in str(err.value)
    assert "did you mean 'model.lora.rank'" in str(err.value)


def test_misspelled_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"optimm: unknown key; did you mean 'optim'"):
        load_config(write(tmp_path, "optimm:\n  lr: 1.0\n"))


def test_bad_value_names_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"run.precision: 'fp16' is not one of"):
        load_config(write(tmp_path, "run:\n  precision: fp16\n"))
    with pytest.raises(ConfigError, match=r"optim.lr: must be a positive number"):
        load_config(write(tmp_path, "optim:\n  lr: -0.1\n"))
    with pytest.raises(ConfigError, match=r"data.micro_batch_size: expected an integer"):
        load_config(write(tmp_path, "data:\n  micro_batch_size: eight\n"))


def test_override_of_nested_key(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  lora:\n    rank: 4\n"), ["model.lora.rank=16", "optim.lr=2e-4"])
    assert cfg.model.lora.rank == 16
    assert cfg.optim.lr == pytest.approx(2e-4)


def test_override_checked_like_yaml(tmp_path):
    path = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match=r"model.lora.rnak: unknown key; did you mean 'model.lora.rank'"):
        load_config(path, ["model.lora.rnak=8"])
    with pytest.raises(ConfigError, match=r"expected the form a.b.c=value"):
        load_config(path, ["model.lora.rank"])
    with pytest.raises(ConfigError, match=r"'run.seed' is a value, not a section"):
        load_config(path, ["run.seed.x=1"])


def test_cross_section_check(tmp_path):
    with pytest.raises(ConfigError, match=r"data.max_len: 32 leaves no room for text after 64 visual tokens"):
        load_config(write(tmp_path, "data:\n  max_len: 32\n"))


def test_nonfinite_skip_below_zero_stage_3_is_refused_before_anything_starts(tmp_path):
    """Only ZeRO-3 declines a step with a non-finite gradient norm; below it a skip would let NaN through."""
    path = write(tmp_path, "run:\n  nonfinite: skip\n")
    assert load_config(path, ["zero.stage=3"]).run.nonfinite == "skip"
    for stage in (0, 1, 2):
        with pytest.raises(
            ConfigError, match=rf"run.nonfinite: skip needs zero.stage=3, got {stage}.*run.nonfinite=stop"
        ):
            load_config(path, [f"zero.stage={stage}"])


def test_base_overlay_merges_deeply(tmp_path):
    (tmp_path / "full.yaml").write_text("model:\n  lora:\n    enabled: true\n    rank: 32\nrun:\n  max_steps: 1000\n")
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text("base: full.yaml\nrun:\n  max_steps: 5\n")
    cfg = load_config(overlay)
    assert (cfg.run.max_steps, cfg.model.lora.rank, cfg.model.lora.enabled) == (5, 32, True)


def test_every_field_documented():
    docs = field_docs(TrainConfig)
    assert "model.lora.rank" in docs
    undocumented = [key for key, doc in docs.items() if not doc]
    assert not undocumented


def test_deepspeed_json_follows_config(tmp_path):
    cfg = load_config(
        None, ["data.micro_batch_size=3", "optim.grad_accum_steps=2", "zero.param_persistence_threshold=0"]
    )
    ds = deepspeed_config(cfg, world_size=2, precision="fp32")
    assert ds["train_batch_size"] == 12
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["bf16"]["enabled"] is False
    assert "auto" not in str(ds)


def test_zero3_sizes_follow_the_hidden_size_unless_set(tmp_path):
    """Threshold 0 (every parameter sharded), buckets as HF's "auto" (h^2, 0.9h^2) but at least
    BUCKET_FLOOR elements; a set value wins."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    def zero(*overrides: str) -> dict:
        return deepspeed_config(load_config(None, list(overrides)), world_size=2, precision="fp32")["zero_optimization"]

    def sizes(section: dict) -> tuple[int, int, int]:
        keys = ("stage3_param_persistence_threshold", "reduce_bucket_size", "stage3_prefetch_bucket_size")
        return tuple(section[key] for key in keys)

    floor = BUCKET_FLOOR
    assert floor == 50_000_000
    assert sizes(zero()) == (0, floor, floor)  # the tiny preset: h = 64, h^2 far under the floor
    assert sizes(zero("model.tiny.hidden_size=128", "model.tiny.num_heads=4")) == (0, floor, floor)
    # A local model folder: the language model's width, read from its config before any weight loads.
    # At LLaVA-1.5-7B's h = 4096 the buckets are still the floor (h^2 = 1.7e7); at h = 8192 HF's h^2 and 0.9h^2.
    text = LlamaConfig(hidden_size=4096, num_hidden_layers=1, num_attention_heads=32, intermediate_size=128)
    vision = CLIPVisionConfig(hidden_size=32, num_attention_heads=4)
    LlavaConfig(text_config=text, vision_config=vision).save_pretrained(tmp_path)
    assert sizes(zero("model.preset=none", f"model.path={tmp_path}")) == (0, floor, floor)
    text = LlamaConfig(hidden_size=8192, num_hidden_layers=1, num_attention_heads=64, intermediate_size=128)
    LlavaConfig(text_config=text, vision_config=vision).save_pretrained(tmp_path)
    assert sizes(zero("model.preset=none", f"model.path={tmp_path}")) == (0, 8192**2, int(0.9 * 8192**2))
    assert sizes(zero("zero.param_persistence_threshold=640")) == (640, floor, floor)
    assert sizes(zero("zero.reduce_bucket_size=500", "zero.prefetch_bucket_size=700")) == (0, 500, 700)
    assert "reduce_bucket_size" in zero("zero.stage=2") and "stage3_prefetch_bucket_size" not in zero("zero.stage=2")
    with pytest.raises(ConfigError, match="zero.prefetch_bucket_size: must be at least 1 or null"):
        load_config(None, ["zero.prefetch_bucket_size=0"])


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_every_shipped_config_validates(path):
    load_config(path)


def test_validate_cli_fails_fast_and_spawns_nothing(tmp_path):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mtrain", "validate", str(REPO / "configs/tiny.yaml"), "model.lora.rnak=8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert "model.lora.rnak" in proc.stderr and "model.lora.rank" in proc.stderr
    assert elapsed < 15
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_key_given_twice_is_refused_with_a_quoting_hint(tmp_path):
    path = write(tmp_path, "{}\n")
    # What an unquoted `data.shards=data/sample/shard-{000000..000001}.tar` becomes after bash's brace expansion.
    expanded = ["data.shards=data/sample/shard-000000.tar", "data.shards=data/sample/shard-000001.tar"]
    with pytest.raises(ConfigError, match=r"data.shards: given twice .*quote"):
        load_config(path, expanded)
    with pytest.raises(ConfigError, match=r"optim.lr: given twice"):
        load_config(path, ["optim.lr=1e-3", " optim.lr =2e-3"])
    assert load_config(path, ["optim.lr=1e-3", "optim.warmup_steps=2"]).optim.warmup_steps == 2


def test_validate_checks_inputs_except_remote_ones(tmp_path, capsys):
    from mtrain.cli import main

    config = write(
        tmp_path, f"run:\n  dir: {tmp_path / 'run'}\ndata:\n  shards: {tmp_path}/shard-{{000000..000001}}.tar\n"
    )
    assert main(["validate", str(config)]) == 2
    assert "data.shards: 2 shard(s) not found" in capsys.readouterr().err
    assert main(["validate", str(config), "model.preset=none", "model.path=/nowhere/llava"]) == 2
    err = capsys.readouterr().err
    assert "model.path='/nowhere/llava' is not a Hugging Face model folder" in err and "run.remote_paths" in err
    # Marked as living where the ranks run: not required here. URLs never are.
    assert (
        main(
            [
                "validate",
                str(config),
                "model.preset=none",
                "model.path=/nowhere/llava",
                "run.remote_paths=[data.shards,model.path]",
            ]
        )
        == 0
    )
    assert main(["validate", str(config), "data.shards=http://127.0.0.1:9/shard-{000000..000001}.tar"]) == 0
    assert main(["validate", str(config), "--config-only"]) == 0
    capsys.readouterr()
    with pytest.raises(ConfigError, match=r"run.remote_paths: \['data.shard'\] are not path keys"):
        load_config(config, ["run.remote_paths=[data.shard]"])
