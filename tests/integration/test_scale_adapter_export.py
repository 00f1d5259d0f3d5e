"""Scale-specific adapters export as stock PEFT folders; stacked on the base they give the merged export."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import BIN, REPO, run

pytestmark = pytest.mark.timeout(300)


def test_shared_plus_per_scale_export_loads_in_stock_peft(tmp_path, shards_pattern, capsys):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    run_dir = tmp_path / "run"
    proc = run([str(BIN / "python"), "-m", "mtrain", "train", str(REPO / "configs/tiny.yaml"), f"run.dir={run_dir}",
                f"data.shards={shards_pattern}", "run.max_steps=3", "optim.warmup_steps=0", "logging.progress=false",
                "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16,64]",
                "model.lora.strategy=shared_plus_per_scale", "model.lora.dropout=0.0"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0
    export = run_dir / "export"
    meta = json.loads((export / "mtrain.json").read_text())["matryoshka"]
    assert (
        meta["scales"] == [1, 4, 16, 64] and meta["strategy"] == "shared_plus_per_scale" and meta["default_scale"] == 64
    )
    assert sorted(p.name for p in (export / "adapter").iterdir() if p.is_dir()) == [
        "scale_1",
        "scale_16",
        "scale_4",
        "scale_64",
        "shared",
    ]

    # A full-grid input: export/model is merged at the default scale (64), i.e. base + shared + scale_64.
    ids = torch.tensor([[1] + [4] * 64 + [100, 101, 102]])
    pixels = torch.randn(1, 3, 32, 32)
    merged = AutoModelForImageTextToText.from_pretrained(export / "model").eval()
    base = AutoModelForImageTextToText.from_pretrained(export / "base").eval()
    with torch.no_grad():
        want = merged(input_ids=ids, pixel_values=pixels).logits
        stacked = PeftModel.from_pretrained(base, export / "adapter" / "shared")
        stacked.load_adapter(export / "adapter" / "scale_64", adapter_name="scale_64")
        stacked.base_model.set_adapter(["default", "scale_64"])
        got = stacked.eval()(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    check_infer_equals_mtrain_at_every_scale(run_dir, export, [1, 4, 16, 64])

    # Stock AutoProcessor + generate: the trained prompt format, the model's 64 image tokens, an answer.
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(export / "model")
    messages = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<s>A chat between a user and an assistant. USER: <image>\nWhat is in the picture? ASSISTANT:"
    inputs = processor(images=Image.new("RGB", (40, 40), (200, 30, 30)), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == merged.config.image_token_id).sum()) == 64
    with torch.no_grad():
        generated = merged.generate(**inputs, max_new_tokens=4, do_sample=False)
        first = merged(**inputs).logits[0, -1].argmax()
    assert generated.shape[1] > inputs["input_ids"].shape[1] and generated[0, inputs["input_ids"].shape[1]] == first

    # --adapter-only copies every adapter the checkpoint holds; each folder loads in stock PEFT.
    from mtrain.checkpoint.export import export_checkpoint

    only = export_checkpoint(run_dir / "checkpoints", tmp_path / "adapter-only", adapter_only=True) / "adapter"
    names = sorted(p.name for p in only.iterdir() if p.is_dir())
    assert names == ["scale_1", "scale_16", "scale_4", "scale_64", "shared"]
    for name in names:
        loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(export / "base"), only / name)
        assert "default" in loaded.peft_config

    check_mtrain_generate(run_dir, export, tmp_path, capsys)

    # `mtrain inspect` names the scales, the adapters, and what a given config would change.
    proc = run([str(BIN / "python"), "-m", "mtrain", "inspect", str(run_dir / "checkpoints"), "--config",
                str(REPO / "configs/tiny.yaml"), f"run.dir={run_dir}", "model.lora.rank=4"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0
    assert "visual scales (m3, policy all): [1, 4, 16, 64]" in proc.stdout
    assert (
        "strategy shared_plus_per_scale: adapters ['scale_1', 'scale_16', 'scale_4', 'scale_64', 'shared']"
        in proc.stdout
    )
    assert "model.lora.rank: 8 -> 4  (blocks a resume)" in proc.stdout
    assert "matryoshka.tokens.mode: 'm3' -> 'none'" in proc.stdout
    # Given the run folder, it reads the checkpoints folder inside.
    proc = run([str(BIN / "python"), "-m", "mtrain", "inspect", str(run_dir)], cwd=tmp_path)
    assert proc.returncode == 0
    assert f"{run_dir / 'checkpoints'}: 1 complete checkpoint(s), latest -> step_00000003" in proc.stdout


INFER_SCRIPT = """
import json, sys, torch
from mtrain.infer import MatryoshkaModel
export, batch_file, out_file, scales = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
model = MatryoshkaModel.from_export(export)
batch = torch.load(batch_file)
out = {scale: model.logits(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], scale=scale) for scale in scales}
out["generated"] = model.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], scale=16, max_new_tokens=3, do_sample=False)
torch.save(out, out_file)
from mtrain.infer import main  # the command line: stock AutoProcessor, the chat template, one answer
main([export, "--image", sys.argv[5], "--prompt", "What is in the picture?", "--scale", "4", "--max-new-tokens", "3"])
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("mtrain", "data_pipeline", "deepspeed")))))
"""


def check_infer_equals_mtrain_at_every_scale(run_dir, export, scales: list[int]) -> None:
    """`mtrain.infer` on the export, in a process that imports no training code, gives the logits of
    mtrain's own per-scale forward of the checkpoint (scale adapters routed by token scale) at every scale."""
    from mtrain.eval.budget import load_for_eval
    from mtrain.infer import MatryoshkaModel

    cfg, built, task = load_for_eval(run_dir / "checkpoints", [])
    text = built.tokenizer("a red circle is shown").input_ids[1:]
    ids = torch.tensor([[built.tokenizer.bos_token_id] + [built.image_token_id] * 64 + text])
    torch.manual_seed(0)
    batch = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32)}
    torch.save(batch, run_dir / "infer_batch.pt")
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(run_dir / "picture.png")
    proc = run([str(BIN / "python"), "-c", INFER_SCRIPT, str(export), str(run_dir / "infer_batch.pt"),
                str(run_dir / "infer_out.pt"), json.dumps(scales), str(run_dir / "picture.png")], cwd=run_dir)  # fmt: skip
    assert proc.returncode == 0
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [
        "mtrain",
        "mtrain.infer",
        "mtrain.model",
        "mtrain.model.anyres",
        "mtrain.model.embedding_head",
        "mtrain.model.token_scales",
    ]
    inferred = torch.load(run_dir / "infer_out.pt")
    reference = {}
    for scale in scales:
        with torch.no_grad():
            logits, layout = task.run({**batch, "labels": ids.clone()}, [scale])
        assert inferred[scale].shape[1] == 1 + scale + len(text) == int((layout.token_scales > 0).sum())
        torch.testing.assert_close(inferred[scale], logits, rtol=1e-5, atol=1e-5)
        reference[scale] = logits
    assert inferred["generated"][0, 0] == inferred[16][0, -1].argmax()

    # The adapters matter: scale 1's prompt through scale 4's adapters is another model.
    model = MatryoshkaModel.from_export(export)
    inputs = model.scaled_inputs(ids, batch["pixel_values"], scale=1)
    model.use_scale_adapters(4)
    with torch.no_grad():
        assert (model.model(**inputs).logits - reference[1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="scale=9 has no adapter"):
        model.logits(input_ids=ids, pixel_values=batch["pixel_values"], scale=9)


def check_mtrain_generate(run_dir, export, tmp_path, capsys) -> None:
    """`mtrain generate` prints the same answer from the export (stock loading) and from the checkpoint (loaded as
    `mtrain eval` loads it, the scale adapters routed as in training); bad inputs exit 2 with the reason."""
    from mtrain.cli import main

    picture = str(run_dir / "picture.png")  # written by check_infer_equals_mtrain_at_every_scale
    ask = ["--image", picture, "--prompt", "What is in the picture?", "--max-new-tokens", "3"]
    answers = []
    for source in (export, run_dir / "checkpoints"):
        assert main(["generate", str(source), *ask, "--scale", "4"]) == 0
        answers.append(capsys.readouterr().out.strip().splitlines()[-1])  # after what loading the checkpoint prints
    assert answers[0] and answers[0] == answers[1], answers
    bad = {
        "no such file": ["generate", str(export), *ask[2:], "--image", str(tmp_path / "missing.png")],
        "trained at the visual-token scales [1, 4, 16, 64]": ["generate", str(export), *ask, "--scale", "9"],
        "not an mtrain checkpoint": ["generate", str(tmp_path), *ask],
    }
    for reason, argv in bad.items():
        assert main(argv) == 2, reason
        assert reason in capsys.readouterr().err
