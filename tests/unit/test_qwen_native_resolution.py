"""Qwen's native resolution (`model.image_pixels`), in one process on the tiny presets: two images of other
aspect ratios and sizes, each its own merged grid and token count. At full scale the logits equal the stock
model's forward on the stock processor's output; the one-pass all-scale loss equals separate per-scale stock
forwards, each image pooled by the scale's factor with M-RoPE ids from its pooled grid; packed documents give
their unpacked losses; Qwen3-VL's DeepStack sets alike; the loader expands each image to its own count, read from its header."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from data_pipeline.collate import IMAGE_GRID_THW, ROW_IMAGES, ROW_TOKENS
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.model.families.qwen2_vl import merged_grid, pool_merged, pooled_grid_thw
from tests.family_checks import (
    assert_one_pass_equals_separate_grads,
    assert_packed_equals_unpacked_per_document,
    assert_text_only_batch_reaches_vision_at_zero_weight,
    lora_task,
    m3_lora_config,
    rows_at_scale,
    shrink_runs_per_image,
    text_ids,
)

# max_pixels 2048 in 8-px merged tokens: a 32-token reference grid; scales 8 and 32 pool by 2 and 1 per side,
# so every image is resized to sides that are multiples of 16 px.
PIXELS, SCALES, FACTORS = "model.image_pixels=[256,2048]", [8, 32], {8: 2, 32: 1}
# (width, height) in PIL's order: a tall 6x4 merged grid (24 tokens) and a wide 2x8 one (16 tokens).
SIZES = [(32, 48), (64, 16)]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def native_task(preset: str = "tiny-qwen2-vl", layout: str = "packed"):
    return lora_task(m3_lora_config(preset, SCALES, PIXELS, f"matryoshka.tokens.layout={layout}"))


def images(count: int) -> list[Image.Image]:
    return [Image.new("RGB", SIZES[i % 2], COLOURS[i % 4]) for i in range(count)]


def documents(built, pictures: list[Image.Image]):
    """(input_ids, labels, images) of three documents over `pictures` in order: one image, two, one."""
    grids = [built.image_processor(images=p)["image_grid_thw"][0].tolist() for p in pictures]
    counts = iter(built.image_processor.visual_tokens(g) for g in grids)
    docs = []
    for prompt, answer, n in [("user\n", "a red circle.", 1), ("two\n", "a blue square.", 2), ("", "a cross.", 1)]:
        prefix = text_ids(built, "<|im_start|>" + prompt)
        for _ in range(n):
            vision = [built.image_token_id] * next(counts)
            prefix += text_ids(built, "<|vision_start|>") + vision + text_ids(built, "<|vision_end|>")
        learned = text_ids(built, answer + "<|im_end|>")
        docs.append((prefix + learned, [IGNORE_INDEX] * len(prefix) + learned, n))
    return docs


def batches(built, pictures):
    """(unpacked, packed) batches of the three documents, as the loader gives native images: every image's
    patches in one sequence and its `image_grid_thw` row in a host list."""
    outputs = [built.image_processor(images=p) for p in pictures]
    pixel_values = torch.cat([o["pixel_values"][0] for o in outputs])
    grid_thw = [o["image_grid_thw"][0].tolist() for o in outputs]
    docs = documents(built, pictures)
    width, pad = max(len(ids) for ids, _, _ in docs), built.tokenizer.pad_token_id
    unpacked = {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in docs]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels, _ in docs]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in docs]),
        "pixel_values": pixel_values,
        IMAGE_GRID_THW: grid_thw,
        # Rows' real tokens and images, as collate counts them: an image's token count is its own.
        ROW_TOKENS: [len(ids) for ids, _, _ in docs],
        ROW_IMAGES: [n for _, _, n in docs],
    }
    row = [token for ids, _, _ in docs for token in ids]
    packed = {
        "input_ids": torch.tensor([row]),
        "labels": torch.tensor([[label for _, labels, _ in docs for label in [IGNORE_INDEX, *labels[1:]]]]),
        "attention_mask": torch.ones(1, len(row), dtype=torch.long),
        "position_ids": torch.tensor([[p for ids, _, _ in docs for p in range(len(ids))]]),
        "pixel_values": pixel_values,
        IMAGE_GRID_THW: grid_thw,
        ROW_TOKENS: [len(row)],
        ROW_IMAGES: [len(pictures)],
    }
    return unpacked, packed


def reference_scale_loss(task, batch, scale: int) -> torch.Tensor:
    """One scale through the stock model: its own per-image features (Qwen3-VL: and every DeepStack set), each
    pooled by the scale's factor, M-RoPE ids from `get_rope_index` on every image's pooled grid."""
    model, factor = task.llava, FACTORS[scale]
    grid_thw = torch.tensor(batch[IMAGE_GRID_THW])
    output = model.model.get_image_features(pixel_values=batch["pixel_values"], image_grid_thw=grid_thw)
    grids = [merged_grid(g, 2) for g in grid_thw]

    def pooled(level) -> list[torch.Tensor]:
        return [pool_merged(f, g, factor) for f, g in zip(level, grids, strict=True)]

    full = [t * r * c for t, r, c in grids]
    kept = [t * (r // factor) * (c // factor) for t, r, c in grids]
    ids, labels, mask = shrink_runs_per_image(batch, task.image_token_id, full, kept)
    is_image = ids == task.image_token_id
    positions, _ = model.model.get_rope_index(
        ids, is_image.int(), image_grid_thw=pooled_grid_thw(grid_thw, factor), attention_mask=mask
    )
    inputs = {"attention_mask": mask, "position_ids": positions, "labels": labels}
    if getattr(output, "deepstack_features", None) is not None:  # Qwen3-VL: its sets as pre-encoded outputs
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        encoded = BaseModelOutputWithDeepstackFeatures(
            pooler_output=pooled(output.pooler_output),
            deepstack_features=[pooled(level) for level in output.deepstack_features],
        )
        inputs.update(input_ids=ids, mm_encoder_outputs={"image": encoded})
    else:
        inputs["inputs_embeds"] = model.get_input_embeddings()(ids).masked_scatter(
            is_image.unsqueeze(-1), torch.cat(pooled(output.pooler_output))
        )
    with rows_at_scale(task, ids.shape[0], scale):
        return model(**inputs).loss


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen3-vl"])
def test_full_scale_logits_equal_the_stock_forward_on_the_stock_processors_output(preset):
    task, built = native_task(preset, layout="padded")
    pictures = images(4)
    unpacked, _ = batches(built, pictures)
    assert unpacked[IMAGE_GRID_THW] == [[1, 12, 8], [1, 4, 16]] * 2  # each image its own grid, in patches
    stock_processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=256, max_pixels=2048
    )
    stock_inputs = stock_processor(images=pictures, return_tensors="pt")
    torch.testing.assert_close(stock_inputs["pixel_values"], unpacked["pixel_values"])
    assert stock_inputs["image_grid_thw"].tolist() == unpacked[IMAGE_GRID_THW]
    ids = unpacked["input_ids"]
    with torch.no_grad():
        logits, layout = task.run(unpacked, [32] * ids.shape[0])
        with rows_at_scale(task, ids.shape[0], 32):
            stock = task.llava(
                input_ids=ids,
                attention_mask=unpacked["attention_mask"],
                mm_token_type_ids=(ids == built.image_token_id).int(),
                **stock_inputs,
            ).logits
    assert torch.equal(layout.input_ids, ids)
    real = unpacked["attention_mask"].bool()
    torch.testing.assert_close(logits[real], stock[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen3-vl"])
def test_one_pass_all_scale_loss_equals_separate_per_scale_stock_forwards(preset):
    task, built = native_task(preset)
    unpacked, _ = batches(built, images(4))
    loss, metrics = task(unpacked)
    assert_one_pass_equals_separate_grads(
        task, loss, lambda: torch.stack([reference_scale_loss(task, unpacked, s) for s in SCALES]).mean()
    )
    learned = int((unpacked["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(metrics["scale_label_tokens"].sum()) == len(SCALES) * learned


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen3-vl"])
def test_packed_documents_give_their_unpacked_losses_with_per_image_mrope_ids(preset):
    task, built = native_task(preset)
    unpacked, packed = batches(built, images(4))
    assert_packed_equals_unpacked_per_document(task, packed, unpacked, SCALES)
    # The packed row's ids at scale 8: the second document's tall image (6x4 merged) pooled to 3x2 from its start.
    _, layout = task.run(packed, [8])
    ids = task.family.layout_position_ids(task.llava, layout, None, built.image_token_id, packed=True)
    assert layout.image_grids == [[1, 6, 4], [1, 2, 8], [1, 6, 4], [1, 2, 8]]  # pooled, in patches
    image = (layout.input_ids[0] == built.image_token_id).nonzero().flatten()
    second = image[6:10]  # after the first image's 6 pooled tokens: the second's 1x4
    first = second[0].item()
    assert ids[2, 0, second].tolist() == [ids[2, 0, first].item()] * 4  # one row
    assert ids[3, 0, second].tolist() == [ids[3, 0, first].item() + c for c in range(4)]


def test_the_loader_gives_every_image_its_own_grid_and_token_count(tmp_path):
    """Real shards through the real loader, packed: each <image> is expanded to its image's own count, read from
    the image's header when planning (read again whole where the header lies past the first 64 KiB; checked
    against the decoded image's grid); the batch
    carries every image's patches in one sequence and its `image_grid_thw`, and trains."""
    import io

    import webdataset as wds

    from data_pipeline.loader import LoaderSettings, build_loader
    from mtrain.engine.data import image_token_counter, token_spec
    from mtrain.model.build import build_model

    cfg = m3_lora_config("tiny-qwen2-vl", SCALES, PIXELS, "data.packing=true", "data.max_len=128")
    built = build_model(cfg.model, torch.float32, None, seed=0, tokens=cfg.matryoshka.tokens)
    sizes = [(32, 48), (64, 16), (50, 40), (64, 16)]  # (50, 40) is resized: smart_resize to 48 x 32 (w x h)
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        for index, size in enumerate(sizes):
            buffer, image = io.BytesIO(), Image.new("RGB", size, COLOURS[index])
            if index == 2:  # a 100 KB ICC profile puts the JPEG's size past the planner's 64 KiB header read
                image.save(buffer, format="JPEG", icc_profile=bytes(range(256)) * 400)
            else:
                image.save(buffer, format="PNG")
            member = "jpg" if index == 2 else "png"
            sink.write({"__key__": f"s{index}", member: buffer.getvalue(), "txt": f"shape number {index}".encode()})
    settings = LoaderSettings(sources=((str(tmp_path / "shard-000000.tar"), 1.0),), batch_size=2, seed=0, packing=True)
    spec, counter = token_spec(cfg, built), image_token_counter(cfg, built)
    loader = build_loader(settings, 0, 1, spec, built.image_processor, built.visual_tokens, image_tokens=counter)
    batch = next(loader)
    grids = batch[IMAGE_GRID_THW]
    counts = [t * h * w // 4 for t, h, w in grids]
    # Merged grids 6x4, 2x8, 4x6 and 2x8, whatever order packing gave the documents.
    assert sorted(map(tuple, grids)) == sorted([(1, 12, 8), (1, 4, 16), (1, 8, 12), (1, 4, 16)])
    assert batch["pixel_values"].shape == (sum(t * h * w for t, h, w in grids), 3 * 2 * 4 * 4)
    image = batch["input_ids"] == built.image_token_id
    assert int(image.sum()) == sum(counts) and batch[ROW_TOKENS] == batch["attention_mask"].sum(1).tolist()
    task = lora_task(cfg)[0]
    loss, metrics = task(batch)
    assert torch.isfinite(loss) and int(metrics["scale_label_tokens"].sum()) > 0


def test_a_text_only_batch_runs_the_vision_path_on_a_one_token_stand_in():
    """ZeRO-3 lockstep without one grid per image: the blank stand-in image is one merged token."""
    from mtrain.model.token_scales import grid_scales
    from mtrain.task.registry import default_m3_budgets

    task, built = native_task()
    assert task.visual_grid is None and task.stand_in_grid == (1, 1)
    # `mtrain eval`'s default budgets: the reference grid's scales (a fixed 4x8 grid has the same ones).
    assert default_m3_budgets(built) == [2, 8, 32] == grid_scales((4, 8))
    assert_text_only_batch_reaches_vision_at_zero_weight(
        task, text_ids(built, "<|im_start|>a cross.<|im_end|>"), "visual.merger"
    )


def test_native_resolution_is_checked_before_any_process_group(tmp_path):
    from mtrain.config import load_config
    from mtrain.config.core import ConfigError
    from mtrain.launch.model_checks import model_problems
    from mtrain.model.build import build_model

    preset = ["model.preset=tiny-qwen2-vl", "matryoshka.tokens.mode=m3"]
    assert load_config(None, [*preset, PIXELS, "matryoshka.tokens.scales=[2,8,32]"]).model.tiny_visual_tokens == 32
    with pytest.raises(
        ConfigError, match=r"\[4\] are no pooling factor f of the 32-token reference grid.*\[2, 8, 32\]"
    ):
        load_config(None, [*preset, PIXELS, "matryoshka.tokens.scales=[4,32]"])
    with pytest.raises(ConfigError, match=r"eval.scales: \[16\] are no pooling factor f of the 32-token"):
        load_config(
            None, [*preset, PIXELS, "matryoshka.tokens.scales=[8,32]", "eval.scales=[8,16]", "eval.shards=x.tar"]
        )
    with pytest.raises(ConfigError, match="model.image_pixels: and model.image_size are both set"):
        load_config(None, [*preset, PIXELS, "model.image_size=[32,32]", "matryoshka.tokens.scales=[32]"])
    with pytest.raises(ConfigError, match="model.image_pixels: is Qwen's native resolution; the tiny-llava preset"):
        load_config(None, ["model.preset=tiny-llava", PIXELS])
    with pytest.raises(ConfigError, match="model.image_pixels: is \\[2048, 256\\]; give \\[min_pixels, max_pixels\\]"):
        load_config(None, [*preset, "model.image_pixels=[2048,256]", "matryoshka.tokens.scales=[32]"])
    with pytest.raises(ConfigError, match="matryoshka.tokens.mode: is 'mqt', which model.image_pixels"):
        load_config(
            None, ["model.preset=tiny-qwen2-vl", "matryoshka.tokens.mode=mqt", "checkpoint.export_at_end=false", PIXELS]
        )
    # A saved Qwen folder: its scales are checked against max_pixels' reference grid, before any process group.
    tiny = load_config(None, [*preset, "matryoshka.tokens.scales=[1]"])
    built = build_model(tiny.model, torch.float32, None, seed=0, config_only=False)
    folder = tmp_path / "qwen"
    built.model.config.save_pretrained(folder)
    built.tokenizer.save_pretrained(folder)
    base = ["model.preset=none", f"model.path={folder}", "matryoshka.tokens.mode=m3", PIXELS]
    assert model_problems(load_config(None, [*base, "matryoshka.tokens.scales=[2,8,32]"])) == []
    (problem,) = model_problems(load_config(None, [*base, "matryoshka.tokens.scales=[4,32]"]))
    assert "scale 4 is no pooling factor of the 32-token reference grid" in problem and "[2, 8, 32]" in problem


def test_header_counts_equal_the_stock_processors_on_any_size():
    """The planner's count from an image's size alone equals the token count of the grid the processor gives:
    the stock processor's (no M3 pooling multiple), and the M3-aligned resize of ours; extreme aspect ratios
    included, where smart_resize goes past max_pixels (so the reference grid is no bound there)."""
    from mtrain.model.families.qwen2_vl import NativeSizeImageProcessor

    stock = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=256, max_pixels=2048)
    sizes = [(8, 8), (5, 7), (17, 23), (300, 20), (64, 32), (33, 95), (1000, 1000), (640, 480), (31, 1500)]
    for pooling, processor in [(1, stock), (2, None)]:
        native = NativeSizeImageProcessor(stock, 256, 2048, pooling)
        processor = processor or native
        for width, height in sizes:
            (grid,) = processor(images=Image.new("RGB", (width, height)), return_tensors="pt")["image_grid_thw"]
            assert native.size_tokens((height, width)) == native.visual_tokens(grid.tolist()), (pooling, width, height)
    assert NativeSizeImageProcessor(stock, 256, 2048, 1).size_tokens((1500, 31)) == 39  # over the 32 of max_pixels


def test_packing_plans_rows_at_each_images_own_count_from_its_header(tmp_path):
    """Two large images (32 tokens, the reference grid) and four small ones (4 tokens), captions of one length:
    rows planned at every image's own count hold three documents each; planned at the reference grid's upper
    bound (the old plan), one each. Every run in the batch is its image's count and no row passes max_len."""
    import io

    import webdataset as wds

    from data_pipeline.loader import LoaderSettings, build_loader
    from mtrain.engine.data import image_token_counter, token_spec
    from mtrain.model.build import build_model

    cfg = m3_lora_config("tiny-qwen2-vl", SCALES, PIXELS, "data.packing=true")
    built = build_model(cfg.model, torch.float32, None, seed=0, tokens=cfg.matryoshka.tokens)
    sizes = [(64, 32), (16, 16), (16, 16), (64, 32), (16, 16), (16, 16)]  # (width, height): 8x4 and 2x2 merged
    shard = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for index, size in enumerate(sizes):
            buffer = io.BytesIO()
            Image.new("RGB", size, COLOURS[index % 4]).save(buffer, format="PNG")
            sink.write({"__key__": f"s{index}", "png": buffer.getvalue(), "txt": b"a shape."})
    counter = image_token_counter(cfg, built)
    text = 7  # the prompt's newline, the caption's 3 tokens, two image markers and EOS
    large, small = text + 32, text + 4
    spec = replace(token_spec(cfg, built), max_len=large + 2 * small)  # below two documents at the upper bound

    def rows(image_tokens) -> list[list[str]]:
        settings = LoaderSettings(sources=((str(shard), 1.0),), batch_size=1, seed=0, packing=True)
        loader = build_loader(
            settings, 0, 1, spec, built.image_processor, built.visual_tokens, image_tokens=image_tokens
        )
        taken: list[list[str]] = []
        while sum(map(len, taken)) < len(sizes):
            batch = next(loader)
            taken.append(batch["keys"])
            assert batch[ROW_TOKENS][0] <= spec.max_len
            if image_tokens is not None:
                runs = (batch["input_ids"][0] == built.image_token_id).sum()
                assert int(runs) == sum(t * h * w // 4 for t, h, w in batch[IMAGE_GRID_THW])
        return taken

    assert [len(row) for row in rows(counter)] == [3, 3]
    assert [len(row) for row in rows(None)] == [1] * 6


def test_checking_runs_and_stacking_pixels_fail_with_errors_that_name_the_fix():
    from data_pipeline.images import stack_crops
    from data_pipeline.tokenize import TokenizedSample, check_image_runs

    doc = TokenizedSample("k", [1, 9, 9, 2, 9, 3], [-100] * 5 + [3], [(1, 3), (4, 5)], [], image_sizes=[(8, 8), (4, 4)])
    check_image_runs(doc, [(8, 8), (4, 4)], [2, 1])
    with pytest.raises(ValueError, match=r"planned at sizes \[\(8, 8\), \(4, 4\)\] with \[2, 1\] visual tokens"):
        check_image_runs(doc, [(8, 8), (4, 4)], [3, 1])
    with pytest.raises(ValueError, match=r"decode to sizes \[\(8, 8\), \(4, 4\)\].*must resize alike"):
        check_image_runs(doc, [(8, 8), (5, 4)], [2, 1])
    padded = stack_crops([torch.ones(5, 3, 4, 4), torch.ones(3, 3, 4, 4)])  # anyres crops: zero-padded to the most
    assert padded.shape == (2, 5, 3, 4, 4) and not padded[1, 3:].any()
    with pytest.raises(ValueError, match=r"shapes \[\(3, 4, 4\), \(3, 8, 8\)\], which no batch stacks"):
        stack_crops([torch.ones(3, 4, 4), torch.ones(3, 8, 8)])


def test_contrastive_at_native_resolution_pools_the_stock_forwards_last_token(tmp_path):
    """Pairs from the real pair loader whose query images have two sizes: each image is planned at its own count
    (from its header), its grid the stock processor's; the embedding is the last real token's final hidden state
    of the stock forward on the stock processor's output, whole or in GradCache chunks (patches sliced per image)
    or through the embed API, and the InfoNCE loss trains."""
    import io

    import webdataset as wds

    from data_pipeline.loader import LoaderSettings, build_loader
    from data_pipeline.pairs import PairForm
    from mtrain.config import load_config
    from mtrain.embed import Embedder
    from mtrain.engine.data import pair_spec
    from mtrain.model.build import build_model
    from mtrain.task.contrastive import slice_pairs
    from mtrain.task.registry import build_task

    cfg = load_config(None, ["model.preset=tiny-qwen2-vl", PIXELS, "task.objective=contrastive", "data.max_len=96"])
    built = build_model(cfg.model, torch.float32, None, seed=0)
    task = build_task(cfg, built, rank=0)
    pictures = images(2)  # 32x48 and 64x16 (width x height): merged grids 6x4 and 2x8
    with wds.TarWriter(str(tmp_path / "pairs-000000.tar")) as sink:
        for index, picture in enumerate(pictures):
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            sink.write(
                {"__key__": f"p{index}", "query.png": buffer.getvalue(), "positive.txt": f"shape {index}".encode()}
            )
    settings = LoaderSettings(sources=((str(tmp_path / "pairs-000000.tar"), 1.0),), batch_size=2, seed=0, shuffle=False)
    loader = build_loader(
        settings, 0, 1, None, built.image_processor, built.visual_tokens, form=PairForm(pair_spec(cfg, built))
    )
    batch = next(loader)
    stock = [built.image_processor.processor(images=p, return_tensors="pt") for p in pictures]  # Qwen's own resize
    grid_thw = torch.cat([out["image_grid_thw"] for out in stock])
    assert batch["query_image_grid_thw"] == grid_thw.tolist() == [[1, 12, 8], [1, 4, 16]]
    ids, mask = batch["query_input_ids"], batch["query_attention_mask"]
    is_image = ids == built.image_token_id
    assert is_image.sum(1).tolist() == [24, 16]  # each run its image's own count
    with torch.no_grad():
        queries, _ = task.encode_pairs(batch, [task.depth])
        hidden = task.llava.model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=torch.cat([out["pixel_values"] for out in stock]),
            image_grid_thw=grid_thw,
            mm_token_type_ids=is_image.int(),
            output_hidden_states=True,
        ).hidden_states[-1]
        chunks = [task(slice_pairs(batch, row, row + 1, task), embed_layers=[task.depth])[0] for row in range(2)]
    want = hidden[torch.arange(2), mask.sum(1) - 1]
    torch.testing.assert_close(queries[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(chunks, dim=1)[0], want, rtol=1e-5, atol=1e-5)
    loss, _ = task(batch)
    loss.backward()
    assert torch.isfinite(loss) and task.llava.model.visual.merger.mlp[0].weight.grad.abs().sum() > 0
    # The embed API (retrieval, `mtrain embed`): in-memory images, each its own count and grid, the same vectors.
    embedder = Embedder(task, pair_spec(cfg, built), built.image_processor)
    instruction = cfg.task.contrastive.query_instruction
    embedded = embedder.raw_embeddings([(p, "") for p in pictures], task.depth, instruction)
    torch.testing.assert_close(embedded, want, rtol=1e-5, atol=1e-5)
