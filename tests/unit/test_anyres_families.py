"""The anyres families, LLaVA-OneVision (tiny-llava-onevision: SigLIP, Qwen2, ChatML) and LLaVA-NeXT
(tiny-llava-next: CLIP, Llama, LLaVA-1.5's template): each image's anyres count and full-scale tokens
equal the stock processor's and model's, M3 pools every crop before the merge (newlines follow the
pooled grid), the one-pass all-scale loss equals separate per-scale forwards, packed equals unpacked
per document, the ChatML template's ids and assistant mask equal apply_chat_template's, and the
export reloads in stock transformers with the training forward's logits."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.formats import conversation_messages
from data_pipeline.tokenize import IGNORE_INDEX, TokenSpec, tokenize_sample
from mtrain.checkpoint.export import _save_hf_folder
from mtrain.config import load_config
from mtrain.model.build import build_model
from mtrain.model.tokenizer import build_tiny_tokenizer
from mtrain.task.registry import build_task
from mtrain.task.token_layout import shrink_image_runs
from tests.data_factory import make_loader, write_mixed_shards
from tests.family_checks import TWO_TURNS, assert_one_pass_equals_separate_grads, conversation, lora_task, rows_at_scale

pytestmark = pytest.mark.timeout(300)

TINY = ["model.tiny.image_size=16", "model.tiny.patch_size=4"]
PRESETS = ["tiny-llava-onevision", "tiny-llava-next"]
SCALES = [1, 4, 16]  # 1x1, 2x2 and 4x4 per crop of the 4x4 patch grid
SIZES = [(48, 48), (12, 40), (40, 12), (20, 32)]  # square (2x2 crops), wide and tall (unpadded), 2x2 unpadded


def anyres_cfg(preset: str, *overrides: str):
    scales = f"matryoshka.tokens.scales={SCALES}".replace(" ", "")
    return load_config(None, [f"model.preset={preset}", *TINY, "matryoshka.tokens.mode=m3", scales, *overrides])


def build_plain(preset: str):
    built = build_model(anyres_cfg(preset, "model.lora.enabled=false").model, torch.float32, None, seed=0)
    built.model.eval()
    return built


@pytest.fixture(scope="module", params=PRESETS)
def plain(request):
    return build_plain(request.param)


@pytest.fixture(scope="module")
def onevision():
    return build_plain("tiny-llava-onevision")


def picture(size: tuple[int, int]) -> Image.Image:
    height, width = size
    return Image.fromarray(np.random.RandomState(height * width).randint(0, 255, (height, width, 3), dtype=np.uint8))


def stock_processor_count(config, image_processor, size: tuple[int, int]) -> int:
    """The stock processor's own count of an image's tokens. LLaVA-NeXT's processor expands `<image>`;
    OneVision's cannot be built without torchvision (its video processor needs it), so its own counting
    methods run on its settings."""
    from transformers import LlavaNextProcessor, LlavaOnevisionProcessor

    vision = config.vision_config
    if config.model_type == "llava_next":
        processor = LlavaNextProcessor(
            image_processor=image_processor, tokenizer=build_tiny_tokenizer(), patch_size=vision.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
        )  # fmt: skip
        ids = processor(images=picture(size), text="<image>", return_tensors="pt")["input_ids"]
        return int((ids == config.image_token_id).sum())
    g = vision.image_size // vision.patch_size
    settings = types.SimpleNamespace(
        image_processor=image_processor, num_image_tokens=g * g, vision_aspect_ratio=config.vision_aspect_ratio
    )
    settings._get_unpadded_features = functools.partial(LlavaOnevisionProcessor._get_unpadded_features, settings)
    return LlavaOnevisionProcessor._get_number_of_features(settings, *size, vision.image_size, vision.image_size)


def test_counts_and_full_scale_tokens_equal_the_stock_processor_and_model(plain):
    config, family = plain.model.config, plain.family
    for size in SIZES:
        inputs = plain.image_processor(images=picture(size), return_tensors="pt")
        count = stock_processor_count(config, plain.image_processor, size)
        assert family.scale_tokens(config, None, size) == count, size
        with torch.no_grad():
            stock = plain.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
            ).pooler_output[0]
            ours = family.scaled_features(plain.model, inputs["pixel_values"], [size], SCALES)
        assert stock.shape[0] == count
        torch.testing.assert_close(ours[16][0], stock, rtol=0, atol=0)
        counts = [ours[s].shape[1] for s in SCALES]
        assert counts == [family.scale_tokens(config, s, size) for s in SCALES]
        assert counts == sorted(set(counts)), counts  # fewer tokens at every smaller scale
    assert plain.visual_tokens == family.scale_tokens(config, None, (48, 48)) == 88  # 16 + 8 rows of 8 + newline
    assert type(plain.model) is family.model_class()


def test_m3_pools_each_crop_before_the_merge_and_newlines_follow_the_pooled_grid(plain):
    family = plain.family
    size = (20, 32)  # 2x2 crops; unpadding keeps 6 of 8 rows at full scale, 2 of 4 at side 2
    inputs = plain.image_processor(images=picture(size), return_tensors="pt")
    with torch.no_grad():
        ours = family.scaled_features(plain.model, inputs["pixel_values"], [size], SCALES)
    full, half, one = ours[16][0], ours[4][0], ours[1][0]
    # The base image comes first at every scale, pooled on its own: 1x1 is the mean of 2x2 is the mean of 4x4.
    torch.testing.assert_close(one[0], full[:16].mean(0))
    torch.testing.assert_close(half[:4].mean(0), full[:16].mean(0))
    newline = plain.model.model.image_newline
    rows, columns = 2, 4  # the 2x2 crops pooled to 2x2 each: a 4x4 merged grid, unpadded to 2 rows
    assert half.shape[0] == 4 + rows * (columns + 1)
    for row in range(rows):
        torch.testing.assert_close(half[4 + row * (columns + 1) + columns], newline)
    # Each pooled crop pools its own 4x4 grid: the merged grid's top-left 2x2 block is crop (0, 0) pooled.
    hidden = plain.model.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True).hidden_states[-1]
    has_cls = plain.model.config.vision_feature_select_strategy == "default"  # CLIP: its CLS token goes
    crops = plain.model.model.multi_modal_projector(hidden[:, 1:] if has_cls else hidden)
    crop = crops[1].reshape(4, 4, -1)
    unpadded_first_row = 1  # rows [1, 3) of the 4 survive unpadding at side 2
    pooled = crop.reshape(2, 2, 2, 2, -1).mean(dim=(1, 3))  # 2x2 pooling of crop (0, 0)
    torch.testing.assert_close(half[4], pooled[unpadded_first_row, 0].detach(), rtol=1e-5, atol=1e-6)


def make_task(preset: str, strategy: str = "shared_plus_per_scale", layout: str = "packed"):
    cfg = anyres_cfg(
        preset,
        "model.lora.enabled=true",
        f"model.lora.strategy={strategy}",
        f"matryoshka.tokens.layout={layout}",
        "model.lora.dropout=0.0",
        "model.freeze.always_train=[lm_head]",
    )
    return lora_task(cfg)


def caption_batch(built, size=(20, 32), rows: int = 3) -> dict:
    tokenizer, config = built.tokenizer, built.model.config
    n = built.family.scale_tokens(config, None, size)
    pixels = built.image_processor(images=[picture(size)] * rows, return_tensors="pt")["pixel_values"]
    ids, labels = [], []
    for row in range(rows):
        caption = tokenizer(["a red circle.", "a blue square shape.", "a green cross."][row]).input_ids
        caption.append(tokenizer.eos_token_id)
        ids.append([built.image_token_id] * n + caption)
        labels.append([IGNORE_INDEX] * n + caption)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
        "pixel_values": pixels + torch.randn_like(pixels) * 0.1 * torch.arange(rows).view(-1, 1, 1, 1, 1),
        "image_sizes": [size] * rows,
    }


def reference_scale_loss(task, built, batch, scale: int) -> torch.Tensor:
    """One scale as a per-scale model trains: the full scale through the stock forward (pixels, image_sizes),
    smaller ones with the family's pooled tokens spliced into the shrunk text."""
    llava, config = task.llava, task.llava.config
    with rows_at_scale(task, batch["input_ids"].shape[0], scale):
        if scale == max(SCALES):
            sizes = torch.tensor(batch["image_sizes"])
            return llava(
                input_ids=batch["input_ids"],
                pixel_values=batch["pixel_values"],
                image_sizes=sizes,
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
            ).loss
        size = batch["image_sizes"][0]
        features = built.family.scaled_features(llava, batch["pixel_values"], batch["image_sizes"], [scale])[scale]
        keep = built.family.scale_tokens(config, scale, size)
        ids, labels, mask = shrink_image_runs(
            batch["input_ids"], batch["labels"], batch["attention_mask"], task.image_token_id,
            task.visual_tokens, keep, built.tokenizer.pad_token_id,
        )  # fmt: skip
        embeds = llava.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == task.image_token_id).unsqueeze(-1), features)
        return llava(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize(
    "preset,strategy,layout",
    [
        ("tiny-llava-onevision", "shared_plus_per_scale", "packed"),
        ("tiny-llava-onevision", "shared", "padded"),
        ("tiny-llava-next", "shared_plus_per_scale", "packed"),
    ],
)
def test_one_pass_equals_mean_of_separate_scale_forwards(preset, strategy, layout):
    task, built = make_task(preset, strategy, layout)
    batch = caption_batch(built)
    task.visual_tokens = 70  # data of one non-square size, (20, 32): the count its images expand to
    adapters = {name.split(".")[-2] for name, p in task.named_parameters() if "lora_A" in name}
    assert adapters == ({"shared", "scale_1", "scale_4", "scale_16"} if strategy != "shared" else {"default"})
    loss, metrics = task(batch)
    assert_one_pass_equals_separate_grads(
        task, loss, lambda: torch.stack([reference_scale_loss(task, built, batch, s) for s in SCALES]).mean()
    )
    assert int(metrics["scale_label_tokens"].sum()) == 3 * int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_a_batch_mixing_image_counts_is_refused_with_the_sizes():
    task, built = make_task("tiny-llava-onevision", "shared")
    batch = caption_batch(built)
    task.visual_tokens = 70
    batch["image_sizes"] = [(20, 32), (12, 40), (20, 32)]
    with pytest.raises(ValueError, match=r"counts each image's visual tokens from its size .*\(12, 40\): 34"):
        task(batch)


def test_packed_loss_equals_unpacked_per_document(tmp_path, plain):
    """Packed rows (sdpa, per-document position ids, no mask) through the stock forward with image_sizes:
    every document gets the loss it has alone; images (several per document) are never split."""
    pattern = write_mixed_shards(tmp_path / "mix", [30])
    loader = make_loader(
        pattern, batch_size=2, max_len=600, visual_tokens=plain.visual_tokens, packing=True,
        tokenizer=plain.tokenizer, processor=plain.image_processor,
    )  # fmt: skip
    batch = next(loader)
    assert len(batch["keys"]) >= 3 and batch["pixel_values"].shape[1:] == (5, 3, 16, 16)
    assert int((batch["input_ids"] == plain.image_token_id).sum()) == 88 * batch["pixel_values"].shape[0]
    model = plain.model

    def token_losses(input_ids, labels, pixel_values, sizes, position_ids=None, attention_mask=None):
        logits = model(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=torch.tensor(sizes),
            position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
        ).logits  # fmt: skip
        return F.pad(F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none"), (1, 0))

    with torch.no_grad():
        packed = token_losses(
            batch["input_ids"], batch["labels"], batch["pixel_values"], batch["image_sizes"], batch["position_ids"]
        )
        real = batch["attention_mask"].bool()
        documents = torch.where(
            real, torch.cumsum(((batch["position_ids"] == 0) & real).flatten(), 0).view(real.shape) - 1, -1
        )
        cursor = 0
        for doc in range(len(batch["keys"])):
            where = documents == doc
            row = int(where.any(dim=1).nonzero()[0])
            ids, labels = batch["input_ids"][row][where[row]][None], batch["labels"][row][where[row]][None]
            n = int((ids == plain.image_token_id).sum()) // 88
            alone = token_losses(
                ids, labels, batch["pixel_values"][cursor : cursor + n], batch["image_sizes"][cursor : cursor + n],
                attention_mask=torch.ones_like(ids),
            )  # fmt: skip
            cursor += n
            learned = labels[0] != IGNORE_INDEX
            assert learned.any()
            torch.testing.assert_close(packed[row][where[row]][learned], alone[0][learned], rtol=1e-4, atol=1e-4)
        assert cursor == batch["pixel_values"].shape[0]


def test_two_turn_chatml_ids_and_assistant_mask_equal_apply_chat_template(onevision):
    plain = onevision
    tokenizer = plain.tokenizer
    messages = conversation_messages(TWO_TURNS)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\n<image>\nWhat digit is this?<|im_end|>\n<|im_start|>assistant\nseven<|im_end|>\n"
        "<|im_start|>user\nAnd its colour?<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n"
    )
    tokens = tokenize_sample(
        conversation(tokenizer, TWO_TURNS), TokenSpec(tokenizer, plain.image_token_id, 512), 1
    )  # one token per <image>
    reference = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert tokens.input_ids == reference["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in tokens.labels] == reference["assistant_masks"]
    learned = [i for i, label in zip(tokens.input_ids, tokens.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "seven<|im_end|>\nIt is red.<|im_end|>\n"
    assert tokenizer.bos_token_id is None and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("preset", PRESETS)
def test_export_reloads_in_stock_transformers_with_the_training_forwards_logits(tmp_path, preset):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    task, built = make_task(preset, "shared")
    _save_hf_folder(task.model.merge_and_unload(), built, tmp_path / "model")
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    image_processor = AutoImageProcessor.from_pretrained(tmp_path / "model")
    assert type(stock) is built.family.model_class()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    count = stock_processor_count(stock.config, image_processor, (20, 32))
    assert count == 70
    if preset == "tiny-llava-next":  # its exported processor expands <image> to the same count
        from transformers import AutoProcessor

        processed = AutoProcessor.from_pretrained(tmp_path / "model")(images=picture((20, 32)), text=prompt)
        assert processed["input_ids"][0].count(built.image_token_id) == count
    ids = tokenizer(prompt.replace("<image>", "<image>" * count), return_tensors="pt")["input_ids"]
    pixels = image_processor(images=picture((20, 32)), return_tensors="pt")
    with torch.no_grad():
        reloaded = stock(input_ids=ids, **pixels).logits
        task.visual_tokens = count  # this one image's count; the task checks the batch against it
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        batch |= {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"].tolist()}
        trained, _ = task.run(batch, [16])
    torch.testing.assert_close(trained, reloaded, rtol=1e-4, atol=1e-5)


def test_a_saved_onevision_folder_loads_and_its_scales_are_checked_before_any_process(tmp_path, onevision):
    """The local-folder path: a tiny OneVision folder (model, ChatML tokenizer, anyres image processor) builds
    through its family, and `model_problems` (run before the process group forms) checks the scales per crop."""
    from mtrain.launch.model_checks import model_problems

    plain = onevision
    folder = tmp_path / "onevision"
    _save_hf_folder(plain.model, plain, folder)
    folder_cfg = ["model.preset=none", f"model.path={folder}", "model.lora.enabled=false"]
    cfg = load_config(None, [*folder_cfg, "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16]"])
    assert model_problems(cfg) == []
    built = build_model(cfg.model, torch.float32, None, seed=0, tokens=cfg.matryoshka.tokens)
    assert type(built.model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert (built.family.model_type, built.visual_tokens, built.image_token_id) == (
        "llava_onevision",
        88,
        plain.image_token_id,
    )
    assert built.tokenizer.chat_template == plain.tokenizer.chat_template
    assert built.image_processor.image_grid_pinpoints == plain.model.config.image_grid_pinpoints
    bad = load_config(None, [*folder_cfg, "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,9]"])
    (problem,) = model_problems(bad)
    assert "[9] do not fit this model's 4x4 grid" in problem
    mqt = load_config(
        None,
        [
            *folder_cfg,
            "matryoshka.tokens.mode=mqt",
            "matryoshka.tokens.scales=[4,16]",
            "matryoshka.tokens.mqt_queries=16",
        ],
    )
    # MQT trains after the folder's own projector and exports (tests/unit/test_family_objectives.py).
    assert model_problems(mqt) == []
    mqt_llava = load_config(
        None, [*folder_cfg, "matryoshka.tokens.mode=mqt", "matryoshka.tokens.mqt_architecture=mqt_llava"]
    )
    assert "matryoshka.tokens.mqt_architecture: mqt_llava is MQT-LLaVA's projector" in model_problems(mqt_llava)[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_next_token_training_passes_image_sizes_and_runs_text_only_batches(preset):
    """task.objective=lm (no scales): the loss on an image batch is the stock forward's with image_sizes, and a
    text-only batch runs the whole vision path on a blank stand-in, times zero (ZeRO-3 lockstep)."""
    cfg = load_config(None, [f"model.preset={preset}", *TINY, "model.lora.enabled=false"])
    built = build_model(cfg.model, torch.float32, None, seed=0)
    task = build_task(cfg, built, rank=0)
    batch = caption_batch(built)
    loss, _ = task(batch)
    sizes = torch.tensor(batch["image_sizes"])
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "labels", "pixel_values")}
    torch.testing.assert_close(loss, built.model(**inputs, image_sizes=sizes).loss)
    text = {name: batch[name][:, 70:] for name in ("input_ids", "attention_mask", "labels")}
    text_loss, _ = task({**text, "pixel_values": torch.zeros(0), "image_sizes": []})
    text_loss.backward()
    assert torch.isfinite(text_loss) and built.model.model.image_newline.grad is not None


def test_mtrain_evals_default_budgets_of_a_model_trained_without_scales_pool_each_crop():
    from mtrain.task.registry import budget_view

    cfg = load_config(None, ["model.preset=tiny-llava-onevision", *TINY, "model.lora.enabled=false"])
    built = build_model(cfg.model, torch.float32, None, seed=0)
    view = budget_view(cfg, built, build_task(cfg, built, rank=0), None)
    assert view.tokens.scales == SCALES  # the 4x4 crop grid's budgets, not those of the 88 tokens an image has
    batch = caption_batch(built)
    view.visual_tokens = 70  # the batch's (20, 32) images
    assert set(view.evaluate_scale(batch, 4)) >= {"loss_sum", "tokens"}


@pytest.mark.parametrize("size", [(48, 48), (20, 32)])
def test_onevisions_anyres_max_shrink_follows_the_pooled_grid(onevision, size):
    """A merged grid larger than anyres_max_N crops' area is shrunk (bilinear) as the stock model does; at a
    pooled scale the ratio is taken against the pooled crop side. anyres_max_1 makes the tiny 2x2 crops shrink."""
    config, family = onevision.model.config, onevision.family
    inputs = onevision.image_processor(images=picture(size), return_tensors="pt")
    config.vision_aspect_ratio = "anyres_max_1"
    try:
        with torch.no_grad():
            stock = onevision.model.model.get_image_features(**inputs).pooler_output[0]
            ours = family.scaled_features(onevision.model, inputs["pixel_values"], [size], SCALES)
        count = stock_processor_count(config, onevision.image_processor, size)
        counts = [family.scale_tokens(config, s, size) for s in SCALES]
    finally:
        config.vision_aspect_ratio = "anyres_max_9"
    torch.testing.assert_close(ours[16][0], stock, rtol=0, atol=0)
    assert stock.shape[0] == count == counts[-1] < family.scale_tokens(config, None, size)
    assert [ours[s].shape[1] for s in SCALES] == counts


def test_image_sizes_in_a_llava_batch_stay_out_of_its_forward():
    """Loader batches carry image_sizes for every family; LLaVA's get_image_features would read them as
    Pixtral's sizes (and fail on a CLIP tower), so only anyres families get them."""
    cfg = load_config(None, ["model.lora.enabled=false"])
    built = build_model(cfg.model, torch.float32, None, seed=0)
    task = build_task(cfg, built, rank=0)
    caption = built.tokenizer("a red circle.").input_ids
    ids = torch.tensor([[built.tokenizer.bos_token_id] + [built.image_token_id] * built.visual_tokens + caption])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
        "pixel_values": torch.randn(1, 3, 32, 32),
    }
    loss, _ = task({**inputs, "image_sizes": [(48, 48)]})
    torch.testing.assert_close(loss, built.model(**inputs).loss)


def mixed_size_batch(tmp_path, cfg, built) -> dict:
    """One loader batch of four captions whose images have the four SIZES (other crop counts and tokens)."""
    import io

    import webdataset as wds

    from data_pipeline.loader import LoaderSettings, build_loader
    from mtrain.engine.data import image_token_counter, token_spec

    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        for index, (height, width) in enumerate(SIZES):
            buffer = io.BytesIO()
            picture((height, width)).save(buffer, format="PNG")
            sink.write({"__key__": f"s{index}", "png": buffer.getvalue(), "txt": f"shape number {index}.".encode()})
    settings = LoaderSettings(sources=((str(tmp_path / "shard-000000.tar"), 1.0),), batch_size=4, seed=0, shuffle=False)
    spec, counter = token_spec(cfg, built), image_token_counter(cfg, built)
    return next(build_loader(settings, 0, 1, spec, built.image_processor, built.visual_tokens, image_tokens=counter))


def test_next_token_training_on_images_of_other_sizes_equals_the_stock_forward(tmp_path):
    cfg = load_config(None, ["model.preset=tiny-llava-next", *TINY, "data.max_len=160"])  # no token scales
    built = build_model(cfg.model, torch.float32, None, seed=0)
    task = build_task(cfg, built, rank=0)
    batch = mixed_size_batch(tmp_path, cfg, built)
    assert len(set((batch["input_ids"] == built.image_token_id).sum(1).tolist())) > 1
    stock = task.llava(
        input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], image_sizes=torch.tensor(batch["image_sizes"]),
        attention_mask=batch["attention_mask"], labels=batch["labels"],
    ).loss  # fmt: skip
    torch.testing.assert_close(task(batch)[0], stock, rtol=1e-5, atol=1e-6)


def test_a_loader_batch_mixing_image_sizes_gives_each_image_its_own_count(tmp_path):
    """Images of other sizes and crop counts in one batch, from the real loader: the crops are zero-padded to the
    most (as the stock processor pads them), each <image> run is its image's own count (from its header's size),
    and the one-pass all-scale loss equals separate per-scale forwards (the full scale the stock forward with
    image_sizes, each smaller one every image's own pooled tokens in its own shrunk run)."""
    from tests.family_checks import shrink_runs_per_image

    cfg = anyres_cfg(
        "tiny-llava-onevision", "model.lora.enabled=true", "model.lora.dropout=0.0",
        "model.freeze.always_train=[lm_head]", "data.max_len=160",
    )  # fmt: skip
    task, built = lora_task(cfg)
    batch = mixed_size_batch(tmp_path, cfg, built)
    config, family = built.model.config, built.family
    sizes = [tuple(size) for size in batch["image_sizes"]]
    assert sorted(sizes) == sorted(SIZES) and batch["pixel_values"].shape[:2] == (4, 5)  # padded to 2x2 crops + base
    full = [family.scale_tokens(config, None, size) for size in sizes]
    assert len(set(full)) > 1 and full == [stock_processor_count(config, built.image_processor, s) for s in sizes]
    assert (batch["input_ids"] == built.image_token_id).sum(1).tolist() == full  # one image a row, its own count
    loss, _ = task(batch)

    def reference(scale: int) -> torch.Tensor:
        with rows_at_scale(task, 4, scale):
            if scale == max(SCALES):
                return task.llava(
                    input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], image_sizes=torch.tensor(sizes),
                    attention_mask=batch["attention_mask"], labels=batch["labels"],
                ).loss  # fmt: skip
            features = torch.cat(family.scaled_image_features(task.llava, batch["pixel_values"], sizes, [scale])[scale])
            kept = [family.scale_tokens(config, scale, size) for size in sizes]
            ids, labels, mask = shrink_runs_per_image(batch, task.image_token_id, full, kept)
            embeds = task.llava.get_input_embeddings()(ids)
            embeds = embeds.masked_scatter((ids == task.image_token_id).unsqueeze(-1), features)
            return task.llava(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    assert_one_pass_equals_separate_grads(task, loss, lambda: torch.stack([reference(s) for s in SCALES]).mean())
