"""MQT and the contrastive objective on every family beyond llava, in one process on each tiny preset.

MQT: the query transformer after the family's own projector (mtrain/model/mqt_head.py; on Qwen3-VL it reads each
DeepStack set too, and dropping the sets must change the logits) gives the all-scale
one-pass loss the mean of separate per-scale forwards through the stock model (its own visual tokens, the
query prefix spliced into the shrunk rows, the query tokens at text positions: on every M-RoPE axis for Qwen,
inside Gemma 3's bidirectional image block), with every gradient; a few optimizer steps lower it.
Contrastive: the pooled embedding equals the last real token's hidden state of the stock model's own forward
(its own image handling and position ids: Qwen's get_rope_index, anyres crops, Gemma 3's image attention),
and a few optimizer steps lower the InfoNCE loss (Qwen3-VL: with its DeepStack sets, which must matter).
MQT export: every family's export reloads with trust_remote_code and gives the task's logits at its scale.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.config import load_config
from mtrain.config.core import ConfigError
from mtrain.model.build import build_model
from mtrain.task.registry import build_task
from mtrain.task.token_layout import shrink_image_runs
from tests.family_checks import (
    WithoutDeepStack,
    assert_one_pass_equals_separate_grads,
    assert_text_only_batch_reaches_vision_at_zero_weight,
    lora_task,
    padded_batch,
    rows_at_scale,
    text_ids,
)
from tests.family_checks import documents as family_documents

pytestmark = pytest.mark.timeout(300)

# (turn start, turn end, image start, image end) in each preset's own tokens.
QWEN_MARKERS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
MARKERS = {
    "tiny-qwen2-vl": QWEN_MARKERS,
    "tiny-qwen2.5-vl": QWEN_MARKERS,
    "tiny-qwen3-vl": QWEN_MARKERS,
    "tiny-llava-onevision": ("<|im_start|>", "<|im_end|>", "", ""),
    "tiny-llava-next": ("USER: ", "</s>", "", ""),
    "tiny-gemma3": ("<bos><start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"),
}
PRESETS = list(MARKERS)
ANYRES_TINY = ["model.tiny.image_size=16", "model.tiny.patch_size=4"]  # as tests/unit/test_anyres_families.py
SIZE = (48, 48)  # an anyres square at least the largest pinpoint: 2x2 crops, no unpadding
QUERIES, MQT_SCALES = 8, [2, 4, 8]


def preset_overrides(preset: str) -> list[str]:
    return [f"model.preset={preset}", *(ANYRES_TINY if "llava" in preset else [])]


def picture(index: int) -> Image.Image:
    noise = np.random.RandomState(index).randint(0, 255, (*SIZE, 3), dtype=np.uint8)
    return Image.fromarray(noise)


def family_pixels(built, images: int) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
    """(pixel values, image sizes for anyres) of `images` distinct pictures through the preset's own processor."""
    pixels = [built.image_processor(images=picture(i), return_tensors="pt")["pixel_values"] for i in range(images)]
    return torch.cat(pixels), ([SIZE] * images if built.family.counts_by_image_size else None)


def is_qwen(built) -> bool:
    return built.family.model_type.startswith("qwen")


def qwen_grid_thw(built, images: int) -> torch.Tensor:
    rows, columns = built.visual_grid
    return torch.tensor([[1, rows * 2, columns * 2]] * images)  # in patches, before the 2x2 merger


def stock_image_inputs(built, pixels: torch.Tensor, sizes) -> dict:
    """The stock model's own image arguments for `pixels`."""
    if is_qwen(built):
        return {"pixel_values": pixels.flatten(0, 1), "image_grid_thw": qwen_grid_thw(built, pixels.shape[0])}
    return {"pixel_values": pixels, **({"image_sizes": torch.tensor(sizes)} if sizes else {})}


# ── MQT ───────────────────────────────────────────────────────────────────────────────────────
def mqt_config(preset: str, strategy: str = "shared_plus_per_scale"):
    return load_config(
        None,
        [
            *preset_overrides(preset),
            "matryoshka.tokens.mode=mqt",
            f"matryoshka.tokens.mqt_queries={QUERIES}",
            f"matryoshka.tokens.scales=[{','.join(map(str, MQT_SCALES))}]",
            "matryoshka.tokens.layout=packed",
            "checkpoint.export_at_end=false",
            "model.lora.enabled=true",
            f"model.lora.strategy={strategy}",
            "model.lora.dropout=0.0",
            "model.freeze.always_train=[lm_head]",
        ],
    )


def reference_mqt_loss(task, built, batch: dict, scale: int) -> torch.Tensor:
    """One scale through the stock model: its own visual tokens through the query transformer, the first `scale`
    queries spliced into the rows shrunk to them, text positions (on every M-RoPE axis for Qwen), Gemma 3's
    image attention from `token_type_ids`."""
    model = task.llava
    visual = model.model.get_image_features(
        **stock_image_inputs(built, batch["pixel_values"], batch.get("image_sizes"))
    )
    head = model.model.mqt_head
    queries = head(torch.stack(list(visual.pooler_output)))[:, :scale]
    ids, labels, mask = shrink_image_runs(
        batch["input_ids"], batch["labels"], batch["attention_mask"], task.image_token_id, QUERIES, scale, 0
    )
    is_image = ids == task.image_token_id
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    extra = {"position_ids": positions[None].expand(3, -1, -1) if is_qwen(built) else positions}
    if built.family.model_type == "gemma3":
        extra["token_type_ids"] = is_image.long()
    if built.family.model_type == "qwen3_vl":
        # The same queries read every DeepStack set; the stock forward splices them and the merged tokens itself.
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        sets = [list(head(torch.stack(list(level)))[:, :scale]) for level in visual.deepstack_features]
        encoded = BaseModelOutputWithDeepstackFeatures(pooler_output=list(queries), deepstack_features=sets)
        with rows_at_scale(task, ids.shape[0], scale):
            return model(
                input_ids=ids, attention_mask=mask, labels=labels, mm_encoder_outputs={"image": encoded}, **extra
            ).loss
    embeds = model.get_input_embeddings()(ids).masked_scatter(is_image.unsqueeze(-1), queries)
    with rows_at_scale(task, ids.shape[0], scale):
        return model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **extra).loss


@pytest.mark.parametrize("preset", PRESETS)
def test_mqt_one_pass_equals_separate_per_scale_forwards_and_steps_lower_it(preset):
    task, built = lora_task(mqt_config(preset))
    assert built.visual_tokens == QUERIES  # every <image> stands for the M query tokens
    head = task.llava.model.mqt_head
    assert any(p.requires_grad for p in head.parameters())  # trained beside LoRA (modules_to_save)
    docs = family_documents(built, *MARKERS[preset])
    pixels, sizes = family_pixels(built, sum(images for _, _, images in docs))
    batch = padded_batch(built, docs, pixels)
    if sizes:
        batch["image_sizes"] = sizes
    loss, metrics = task(batch)
    assert_one_pass_equals_separate_grads(
        task,
        loss,
        lambda: torch.stack([reference_mqt_loss(task, built, batch, s) for s in MQT_SCALES]).mean(),
        grad_rtol=5e-4,
    )
    if built.family.model_type == "qwen3_vl":
        rows = batch["input_ids"].shape[0]
        with torch.no_grad():
            logits = task.run(batch, [QUERIES] * rows)[0]
        assert_dropping_deepstack_moves(task, lambda: task.run(batch, [QUERIES] * rows)[0], logits)
    learned = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(metrics["scale_label_tokens"].sum()) == len(MQT_SCALES) * learned
    assert_steps_lower_the_loss(task, batch)
    task.zero_grad()  # ZeRO-3 lockstep: a text-only batch runs the query transformer too, times zero
    assert_text_only_batch_reaches_vision_at_zero_weight(task, text_ids(built, "a red circle."), "mqt_head")


def assert_dropping_deepstack_moves(task, output, want: torch.Tensor) -> None:
    """Qwen3-VL: the same task wired without its DeepStack sets (the mutation) gives another `output()`."""
    task.given_family = WithoutDeepStack()
    try:
        with torch.no_grad():
            moved = float((output() - want).abs().max())
    finally:
        task.given_family = None
    assert moved > 1e-2, moved


def assert_steps_lower_the_loss(task, batch: dict, steps: int = 6, lr: float = 3e-3) -> None:
    trainable = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = task(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("preset", PRESETS)
def test_mqt_export_reloads_without_mtrain_with_the_tasks_logits_at_its_scale(tmp_path, preset):
    """The export of MQT after a family's own projector: the stock family class plus the query transformer,
    registered code beside the weights (mtrain/model/mqt_families.py, importing nothing of mtrain), loaded by
    transformers' Auto class with trust_remote_code from the folder's own copy of that code (refused without it);
    at the served scale its stock forward (the family's own image inputs and position rule) gives the trained
    task's logits. Qwen3-VL: its DeepStack sets read by the queries too."""
    from transformers import AutoModelForImageTextToText

    from mtrain.checkpoint.export import _save_hf_folder

    task, built = lora_task(mqt_config(preset, strategy="shared"))
    scale = MQT_SCALES[1]  # a prefix of the queries: the export serves the default scale
    docs = family_documents(built, *MARKERS[preset])
    pixels, sizes = family_pixels(built, sum(images for _, _, images in docs))
    batch = padded_batch(built, docs, pixels)
    if sizes:
        batch["image_sizes"] = sizes
    task.model = task.model.merge_and_unload().eval()
    _save_hf_folder(task.model, built, tmp_path / "model", mqt_scale=scale)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == f"mtrain_mqt_{built.family.model_type}" and config["mqt_scale"] == scale
    assert not any("mtrain" in line for line in (tmp_path / "model" / "mqt_families.py").read_text().splitlines()
                   if line.startswith(("import", "from")))  # fmt: skip
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "model", local_files_only=True)
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    assert type(stock).__name__.startswith("MQT") and "mtrain" not in type(stock).__module__
    rows = batch["input_ids"].shape[0]
    with torch.no_grad():
        want, layout = task.run(batch, [scale] * rows)
        ids, mask = layout.input_ids, (layout.token_scales > 0).long()  # one variant per row: padded rows
        is_image = ids == built.image_token_id
        extra = {"mm_token_type_ids": is_image.int()} if is_qwen(built) else {}
        if built.family.model_type == "gemma3":
            extra["token_type_ids"] = is_image.long()
        inputs = stock_image_inputs(built, batch["pixel_values"], sizes)
        got = stock(input_ids=ids, attention_mask=mask, **inputs, **extra).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


def test_mqt_exports_scale_adapters_that_stock_peft_stacks_on_the_remote_code_base(tmp_path):
    """What `mtrain export` writes for MQT after a family's projector with MSS LoRA (`write_model_folders`, on
    tiny-qwen3-vl): export/model, merged at the default scale, and export/base load with trust_remote_code, and
    the base with the shared and default-scale adapters stacked by stock PEFT gives the merged model's logits."""
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from mtrain.checkpoint.export import write_model_folders
    from mtrain.model.families.qwen2_vl import IMAGE_PAD, VISION_END, VISION_START

    cfg = mqt_config("tiny-qwen3-vl")
    _, built = lora_task(cfg)
    assert write_model_folders(built, cfg, tmp_path) == {"model": "model", "base": "base", "adapter": "adapter"}
    assert json.loads((tmp_path / "model" / "config.json").read_text())["mqt_scale"] == MQT_SCALES[-1]
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "base", trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    pixels = AutoImageProcessor.from_pretrained(tmp_path / "model")(images=picture(0), return_tensors="pt")
    text = f"{VISION_START}{IMAGE_PAD * MQT_SCALES[-1]}{VISION_END}\na red circle."
    inputs = {"input_ids": tokenizer(text, return_tensors="pt")["input_ids"], **pixels}
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == built.image_token_id).int()
    with torch.no_grad():
        want = merged(**inputs).logits
        untrained = base(**inputs).logits  # before PEFT wraps it: the adapters must matter
        stacked = PeftModel.from_pretrained(base, tmp_path / "adapter" / "shared")
        stacked.load_adapter(tmp_path / "adapter" / f"scale_{MQT_SCALES[-1]}", adapter_name="scale")
        stacked.base_model.set_adapter(["default", "scale"])
        got = stacked.eval()(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (want - untrained).abs().max() > 1e-3


def test_what_mqt_after_a_familys_projector_cannot_do_is_refused_at_config_load():
    base = ["model.preset=tiny-qwen2-vl", "matryoshka.tokens.mode=mqt", "matryoshka.tokens.mqt_queries=16"]
    load_config(None, base)  # the export holds the query transformer (mtrain/model/mqt_families.py)
    # Greedy generation runs it (tests/unit/test_mqt_family_inference.py).
    assert load_config(None, [*base, "eval.shards=h.tar", "eval.generate_samples=2"]).eval.generate_samples == 2
    with pytest.raises(ConfigError, match="mqt_architecture: mqt_llava is MQT-LLaVA's projector"):
        load_config(None, [*base, "checkpoint.export_at_end=false", "matryoshka.tokens.mqt_architecture=mqt_llava"])
    load_config(None, ["model.preset=tiny-gemma3", "task.objective=contrastive"])  # no longer refused


# ── contrastive ───────────────────────────────────────────────────────────────────────────────
PAIRS = ["a red circle", "a blue square", "a green cross", "a yellow star"]


def right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    return ids, torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])


def pair_batch(built, preset: str) -> dict:
    """Queries of one image and a word each (the image run in the family's markers), text positives."""
    _, _, start, end = MARKERS[preset]
    image = text_ids(built, start) + [built.image_token_id] * built.visual_tokens + text_ids(built, end)
    pad = built.tokenizer.pad_token_id
    query_ids, query_mask = right_padded([image + text_ids(built, f"picture {i}") for i in range(len(PAIRS))], pad)
    positive_ids, positive_mask = right_padded([text_ids(built, text) for text in PAIRS], pad)
    pixels, sizes = family_pixels(built, len(PAIRS))
    batch = {
        "query_input_ids": query_ids,
        "query_attention_mask": query_mask,
        "query_pixel_values": pixels,
        "positive_input_ids": positive_ids,
        "positive_attention_mask": positive_mask,
        "positive_pixel_values": torch.zeros(0, 3, 16, 16),  # a side without images, as the pair loader gives it
    }
    if sizes:
        batch["query_image_sizes"] = sizes
    return batch


def stock_last_token_states(built, model, batch: dict) -> torch.Tensor:
    """The stock model's own forward of the query rows: the last real token's final hidden state."""
    ids, mask = batch["query_input_ids"], batch["query_attention_mask"]
    inputs = stock_image_inputs(built, batch["query_pixel_values"], batch.get("query_image_sizes"))
    is_image = ids == built.image_token_id
    if is_qwen(built):
        inputs["mm_token_type_ids"] = is_image.int()  # stock Qwen-VL makes its M-RoPE ids from them
    if built.family.model_type == "gemma3":
        inputs["token_type_ids"] = is_image.long()  # stock Gemma 3's bidirectional image attention
    hidden = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **inputs).hidden_states[-1]
    return hidden[torch.arange(ids.shape[0]), mask.sum(1) - 1]


@pytest.mark.parametrize("preset", PRESETS)
def test_contrastive_pools_the_stock_forwards_last_token_and_steps_lower_the_loss(preset):
    cfg = load_config(
        None,
        [*preset_overrides(preset), "task.objective=contrastive", "matryoshka.dims.dims=[16,64]"],
    )
    built = build_model(cfg.model, torch.float32, None, seed=0)
    task = build_task(cfg, built, rank=0)
    batch = pair_batch(built, preset)
    with torch.no_grad():
        queries, _ = task.encode_pairs(batch, [task.depth])
        want = stock_last_token_states(built, task.llava, batch)
    torch.testing.assert_close(queries[0], want, rtol=1e-5, atol=1e-5)
    if built.family.model_type == "qwen3_vl":
        assert_dropping_deepstack_moves(task, lambda: task.encode_pairs(batch, [task.depth])[0][0], want)
    assert_steps_lower_the_loss(task, batch, lr=3e-4)  # InfoNCE at temperature 0.02 takes small steps


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-llava-onevision"])
def test_the_pair_loaders_batches_train_the_family(tmp_path, preset):
    """The pair loader's own batches (text-only positives, Qwen's patches, anyres crops with each image's size)."""
    from data_pipeline.pairs import PairForm, write_pair_shards
    from mtrain.engine.data import pair_spec
    from mtrain.eval.run import eval_batches

    write_pair_shards(tmp_path, num_shards=1, samples_per_shard=4, seed=0)
    cfg = load_config(
        None, [*preset_overrides(preset), "task.objective=contrastive", "data.micro_batch_size=4", "data.max_len=192"]
    )
    built = build_model(cfg.model, torch.float32, None, seed=0)
    task = build_task(cfg, built, rank=0)
    stream = eval_batches(cfg, built, str(tmp_path / "pairs-000000.tar"), form=PairForm(pair_spec(cfg, built)))
    batch = next(iter(stream))
    assert batch["query_pixel_values"].shape[0] == 4 and batch["positive_pixel_values"].shape[0] == 0
    assert len(batch["query_image_sizes"]) == 4 and batch["positive_image_sizes"] == []
    ids = batch["query_input_ids"][0].tolist()
    image = [i for i, token in enumerate(ids) if token == built.image_token_id]
    markers = tuple(built.tokenizer.convert_tokens_to_ids(m) for m in built.family.image_markers if m)
    if markers:  # Qwen: a query image sits between its vision markers, as a caption's does
        assert (ids[image[0] - 1], ids[image[-1] + 1]) == markers
    loss, _ = task(batch)
    loss.backward()
    assert torch.isfinite(loss)
