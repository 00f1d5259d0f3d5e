"""Which model families greedy generation runs: the others are refused with `eval.generate_samples` named, at
config load for a preset and before any process group for a folder, and `mtrain generate` / `mtrain.infer`
on such an export stop with a clear error instead of failing inside transformers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mtrain.config import load_config
from mtrain.launch.model_checks import model_problems
from mtrain.model.build import build_model
from mtrain.model.families import FAMILIES
from mtrain.model.families.qwen2_vl import IMAGE_PAD
from tests.conftest import REPO
from tests.unit.test_model_checks import folder_config, tiny_llava_folder

HELD_OUT = ["eval.shards=h.tar", "eval.generate_samples=2"]
M3 = ["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[4,16]"]  # fits every preset's grid; qwen3 needs m3
PRESETS = ["tiny-llava", "tiny-llava-onevision", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl",
           "tiny-qwen3-vl", "tiny-gemma3"]  # fmt: skip


def test_every_family_generates_and_mtrain_infer_lists_the_same():
    from mtrain.infer import GENERATING_MODEL_TYPES  # mtrain.infer imports no family code: its own list

    assert all(family.generates for family in FAMILIES.values())
    assert set(GENERATING_MODEL_TYPES) == set(FAMILIES)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_with_in_loop_generation(preset):
    assert load_config(None, [f"model.preset={preset}", *M3, *HELD_OUT]).eval.generate_samples == 2


def test_the_qwen_recipe_generates_in_the_loop():
    recipe = REPO / "configs/recipes/tiny/lora_sft_matryoshka_qwen2_5_vl.yaml"
    assert load_config(recipe, [*HELD_OUT, "eval.every=2"]).eval.generate_samples == 2


def small_anyres(preset: str) -> list[str]:
    """A 16-px tower for the anyres presets: a sample image's crops stand for 88 tokens, not ~360."""
    return ["model.tiny.image_size=16"] if preset in ("tiny-llava-next", "tiny-llava-onevision") else []


def save_preset_folder(folder, preset: str):
    built = build_model(load_config(None, [f"model.preset={preset}"]).model, torch.float32, None, seed=0)
    built.model.save_pretrained(folder)
    built.tokenizer.save_pretrained(folder)
    built.image_processor.save_pretrained(folder)
    return folder, built


def test_a_folder_whose_family_cannot_generate_is_refused_before_any_process_group(tmp_path, monkeypatch):
    """The refusal a family that cannot generate yet gets (`ModelFamily.generates` False, the default of a new
    family): llava_next stands in for one, its flag switched off."""
    folder, _ = save_preset_folder(tmp_path / "next", "tiny-llava-next")
    assert model_problems(folder_config(folder, *HELD_OUT)) == []
    monkeypatch.setattr(FAMILIES["llava_next"], "generates", False)
    assert model_problems(folder_config(folder, "eval.shards=h.tar")) == []
    (problem,) = model_problems(folder_config(folder, *HELD_OUT))
    assert problem.startswith(f"model.path={str(folder)!r}: eval.generate_samples: greedy generation")
    assert "does not run a llava_next model yet" in problem and "set eval.generate_samples=0" in problem
    assert model_problems(folder_config(tiny_llava_folder(tmp_path / "llava"), *HELD_OUT)) == []


def test_generating_from_an_export_of_a_model_type_it_cannot_run_stops_with_a_clear_error(tmp_path, capsys,
                                                                                          monkeypatch):  # fmt: skip
    """`mtrain generate` and `python -m mtrain.infer` refuse a model type outside GENERATING_MODEL_TYPES before
    loading its processor (llava_next stands in for one)."""
    import mtrain.infer
    from mtrain.cli import main
    from mtrain.infer import MatryoshkaModel, MatryoshkaSpec

    export = tmp_path / "export"
    _, preset = save_preset_folder(export / "model", "tiny-llava-next")
    (export / "mtrain.json").write_text(json.dumps({"matryoshka": {"token_mode": "m3", "scales": [4, 16]}}))
    picture = tmp_path / "picture.png"
    Image.new("RGB", (32, 32), "red").save(picture)
    monkeypatch.setattr(mtrain.infer, "GENERATING_MODEL_TYPES", ("llava",))
    refusal = "this is a 'llava_next' model; mtrain.infer generates (and scores logits) for the model types llava"
    model = MatryoshkaModel(preset.model, MatryoshkaSpec(token_mode="m3", scales=[4, 16]))
    with pytest.raises(ValueError, match=r"'llava_next' model; mtrain.infer generates"):
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    args = ["--image", str(picture), "--prompt", "What is drawn?"]
    assert main(["generate", str(export), *args]) == 2
    assert refusal in capsys.readouterr().err
    assert mtrain.infer.main([str(export), *args]) == 2
    assert refusal in capsys.readouterr().err


# ── the families generation runs through their hooks: the stock model's own greedy tokens at the full scale ──
def qwen_prompts(built, colours: list[str]) -> dict:
    """Two left-padded prompts (different lengths) about two pictures, as Qwen's processor gives them: each
    <|image_pad|> expanded to the image's merged tokens, every image's patches in one sequence, image_grid_thw."""
    tokenizer, processor = built.tokenizer, built.image_processor
    images = [processor(Image.new("RGB", (48, 40), colour)) for colour in colours]
    rows = []
    for n, image in enumerate(images):
        question = "What is drawn?" + " Say it in a word." * n
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        tokens = int(image["image_grid_thw"].prod()) // 4  # the 2x2 merger
        rows.append(tokenizer(text.replace(IMAGE_PAD, IMAGE_PAD * tokens))["input_ids"])
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    pixel_values = torch.cat([image["pixel_values"][0] for image in images])
    image_grid_thw = torch.cat([image["image_grid_thw"] for image in images])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw}  # fmt: skip


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_qwen_greedy_tokens_at_the_full_scale_equal_the_stock_generate(preset):
    from mtrain.infer import MatryoshkaModel, MatryoshkaSpec

    cfg = load_config(None, [f"model.preset={preset}", *M3])
    built = build_model(cfg.model, torch.float32, None, seed=0)
    model = built.model.eval()
    inputs = qwen_prompts(built, ["red", "blue"])
    width = inputs["input_ids"].shape[1]
    is_image = (inputs["input_ids"] == built.image_token_id).int()
    greedy = {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 8}  # no early end: every step compared
    with torch.no_grad():
        stock = model.generate(**inputs, mm_token_type_ids=is_image, **greedy)[:, width:]
    ours = MatryoshkaModel(model, MatryoshkaSpec(token_mode="m3", scales=[4, 16])).generate(**inputs, **greedy)
    assert ours.shape == (2, 8) and torch.equal(ours, stock)
    assert len(set(stock.flatten().tolist())) > 1  # a real sequence, not one token repeated


def test_image_runs_of_different_sizes_keep_their_own_pooled_counts():
    from mtrain.infer import run_keep_mask

    i = 9  # the image token; two rows, three images of 4, 2 and 4 tokens
    ids = torch.tensor([[0, 1, i, i, i, i, 2, i, i, 3], [0, 0, 0, 1, i, i, i, i, 2, 3]])
    mask = torch.tensor([[1] * 10, [0, 0] + [1] * 8])
    keep = run_keep_mask(ids, mask, i, [(4, 1), (2, 2), (4, 2)])
    assert keep.int().tolist() == [[1, 1, 1, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0, 1, 1]]


def test_qwen_in_loop_generation_answers_at_every_pooled_scale(tmp_path):
    """The in-loop evaluation's path on tiny-qwen2.5-vl with per-scale LoRA: the loader's prompts become Qwen's
    patch sequence and image_grid_thw, and every trained scale (pooling factors 4, 2, 1) answers each sample."""
    from data_pipeline.sample_data import write_conversation_shards
    from mtrain.eval.generation import prompt_batches
    from mtrain.eval.held_out import held_out_loader, one_pass
    from tests.unit.test_in_loop_eval import SINGLE, build, evaluate_untouched

    write_conversation_shards(tmp_path, num_shards=1, samples_per_shard=4, seed=2)
    held_out = str(tmp_path / "chat-000000.tar")
    cfg, built, task = build("tiny.yaml", ["model.preset=tiny-qwen2.5-vl", "matryoshka.tokens.mode=m3",
                                           "matryoshka.tokens.scales=[1,4,16]", "model.lora.enabled=true",
                                           "model.lora.strategy=per_scale", f"eval.shards={held_out}",
                                           "eval.generate_samples=3", "eval.max_new_tokens=3",
                                           "data.micro_batch_size=2", "data.max_len=128"])  # fmt: skip
    (first, second) = prompt_batches(one_pass(held_out_loader(cfg, built, SINGLE, held_out)), 3, built)
    assert first.inputs["image_grid_thw"].tolist() == [[1, 8, 8]] * 2  # 32x32 px in 4-px patches, merged 2x2
    assert tuple(first.inputs["pixel_values"].shape) == (2 * 64, 3 * 2 * 4 * 4)
    assert len(second.references) == 1
    metrics = evaluate_untouched(cfg, built, task)
    assert [metrics[f"eval/generated_answers/scale_{scale}"] for scale in (1, 4, 16)] == [3.0, 3.0, 3.0]


def test_gemma3_greedy_tokens_at_the_full_scale_equal_the_stock_generate():
    """Gemma 3's image tokens attend to each other both ways in the prefill (token_type_ids), as in the stock
    generate; two left-padded prompts of different lengths."""
    from mtrain.infer import MatryoshkaModel, MatryoshkaSpec
    from mtrain.model.families.gemma3 import IMAGE_SOFT_TOKEN

    cfg = load_config(None, ["model.preset=tiny-gemma3", *M3])
    built = build_model(cfg.model, torch.float32, None, seed=0)
    model, tokenizer = built.model.eval(), built.tokenizer
    rows = []
    for n in range(2):
        question = "What is drawn?" + " Say it in a word." * n
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        rows.append(tokenizer(text.replace(IMAGE_SOFT_TOKEN, IMAGE_SOFT_TOKEN * built.visual_tokens))["input_ids"])
    width, pad = max(map(len, rows)), tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    pixel_values = torch.cat([built.image_processor(Image.new("RGB", (40, 32), c), return_tensors="pt")["pixel_values"]
                              for c in ("red", "blue")])  # fmt: skip
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    image = (input_ids == built.image_token_id).long()
    assert int(image.sum()) == 2 * 16
    greedy = {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 8}
    with torch.no_grad():
        stock = model.generate(**inputs, token_type_ids=image, **greedy)[:, width:]
    ours = MatryoshkaModel(model, MatryoshkaSpec(token_mode="m3", scales=[4, 16])).generate(**inputs, **greedy)
    assert ours.shape == (2, 8) and torch.equal(ours, stock)


@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-llava-onevision"])
def test_in_loop_generation_answers_at_every_pooled_scale(tmp_path, preset):
    from data_pipeline.sample_data import write_conversation_shards
    from tests.unit.test_in_loop_eval import build, evaluate_untouched

    write_conversation_shards(tmp_path, num_shards=1, samples_per_shard=3, seed=2)
    cfg, built, task = build("tiny.yaml", [f"model.preset={preset}", "matryoshka.tokens.mode=m3",
                                           "matryoshka.tokens.scales=[1,4,16]", f"eval.shards={tmp_path}/chat-000000.tar",
                                           "eval.generate_samples=3", "eval.max_new_tokens=3",
                                           "data.micro_batch_size=2", "data.max_len=256", *small_anyres(preset)])  # fmt: skip
    metrics = evaluate_untouched(cfg, built, task)
    assert [metrics[f"eval/generated_answers/scale_{scale}"] for scale in (1, 4, 16)] == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("preset", ["tiny-llava-onevision", "tiny-llava-next", "tiny-qwen2.5-vl", "tiny-qwen3-vl",
                                    "tiny-gemma3"])  # fmt: skip
def test_logits_at_every_pooled_scale_equal_the_tasks(tmp_path, preset):
    """What generation's prefill runs at a pooled scale is what training runs there: the training model through
    MatryoshkaModel (per-scale LoRA routed) gives the task's own per-scale logits, Qwen's M-RoPE ids from the
    pooled grid and Gemma 3's image attention included; its first greedy token is their argmax."""
    from data_pipeline.sample_data import write_conversation_shards
    from mtrain.eval.generation import generation_model
    from mtrain.eval.held_out import held_out_loader, one_pass
    from tests.unit.test_in_loop_eval import SINGLE, build
    from tests.unit.test_infer import assert_rows_equal, per_scale_logits

    write_conversation_shards(tmp_path, num_shards=1, samples_per_shard=2, seed=3)
    held_out = str(tmp_path / "chat-000000.tar")
    cfg, built, task = build("tiny.yaml", [f"model.preset={preset}", "matryoshka.tokens.mode=m3",
                                           "matryoshka.tokens.scales=[1,4,16]", "model.lora.enabled=true",
                                           "model.lora.strategy=per_scale", "model.lora.dropout=0.0",
                                           f"eval.shards={held_out}", "data.micro_batch_size=2",
                                           "data.max_len=256", *small_anyres(preset)])  # fmt: skip
    task.eval()
    (batch,) = list(one_pass(held_out_loader(cfg, built, SINGLE, held_out)))
    assert int((batch["input_ids"] == built.image_token_id).sum()) == 2 * built.visual_tokens  # an image a row
    reference = per_scale_logits(task, batch, [1, 4, 16])
    model = generation_model(cfg, task, built.scale_routing)
    images = built.family.prompt_images(built.model.config, batch["pixel_values"], built.visual_grid)
    prompt = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        **images,
        "image_sizes": torch.tensor(batch["image_sizes"]),
    }  # fmt: skip (anyres crops by them; others ignore)
    for scale in (1, 4, 16):
        inputs = model.scaled_inputs(**prompt, scale=scale)
        logits = model.logits(**prompt, scale=scale)
        assert_rows_equal(logits, inputs["attention_mask"], reference[scale])


@pytest.mark.parametrize("preset", ["tiny-llava-next", "tiny-llava-onevision"])
def test_anyres_greedy_tokens_at_the_full_scale_equal_the_stock_generate(preset):
    """Two pictures of one size (anyres crops, unpadding and newlines), two left-padded prompts."""
    from mtrain.infer import MatryoshkaModel, MatryoshkaSpec
    from mtrain.model.tokenizer import IMAGE_TOKEN

    cfg = load_config(None, [f"model.preset={preset}", *M3])
    built = build_model(cfg.model, torch.float32, None, seed=0)
    model, tokenizer = built.model.eval(), built.tokenizer
    size = (20, 32)  # 2x2 crops, unpadded
    processed = built.image_processor(images=[Image.new("RGB", size[::-1], c) for c in ("red", "blue")],
                                      return_tensors="pt")  # fmt: skip
    tokens = built.family.scale_tokens(model.config, None, size)
    rows = []
    for n in range(2):
        question = "What is drawn?" + " Say it in a word." * n
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        rows.append(tokenizer(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * tokens))["input_ids"])
    width, pad = max(map(len, rows)), tokenizer.pad_token_id
    inputs = {"input_ids": torch.tensor([[pad] * (width - len(row)) + row for row in rows]),
              "attention_mask": torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows]),
              "pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"]}  # fmt: skip
    assert int((inputs["input_ids"] == built.image_token_id).sum()) == 2 * tokens
    greedy = {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 8}
    with torch.no_grad():
        stock = model.generate(**inputs, **greedy)[:, width:]
    ours = MatryoshkaModel(model, MatryoshkaSpec(token_mode="m3", scales=[4, 16])).generate(**inputs, **greedy)
    assert ours.shape == (2, 8) and torch.equal(ours, stock)


@pytest.mark.parametrize(
    "preset", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-gemma3", "tiny-llava-onevision"]
)
def test_mtrain_generate_answers_alike_from_an_export_and_its_checkpoint(tmp_path, preset):
    """`mtrain generate` on Qwen and OneVision (without torchvision) and Gemma 3: the export's tokenizer and image
    processor build the prompt (`mtrain.infer.ImagePromptProcessor`: each image token expanded to the image's
    merged tokens, as Qwen's processor does, to OneVision's anyres count, or to Gemma 3's 16 soft tokens between
    the markers the trained template writes), and the checkpoint's own (`checkpoint_generator`, what `load_generator` runs after loading it) give the same prompt
    and the same greedy answer at a pooled scale, on a picture the processor resizes."""
    from mtrain.checkpoint.export import EXPORT_METADATA, _save_hf_folder, matryoshka_metadata
    from mtrain.eval.generation import checkpoint_generator, load_generator
    from mtrain.infer import answer
    from mtrain.task.registry import build_task

    cfg = load_config(None, [f"model.preset={preset}", *M3, *small_anyres(preset)])
    built = build_model(cfg.model, torch.float32, None, seed=0)
    task = build_task(cfg, built, rank=0)
    export = tmp_path / "export"
    _save_hf_folder(built.model, built, export / "model")
    (export / EXPORT_METADATA).write_text(json.dumps({"matryoshka": matryoshka_metadata(cfg)}))
    picture = Image.new("RGB", (40, 40), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is drawn?"}]}]
    prompts, answers = [], []
    for model, processor in (load_generator(export), checkpoint_generator(cfg, built, task, "checkpoint")):
        inputs = processor(images=picture, text=processor.apply_chat_template(messages, add_generation_prompt=True))
        prompts.append(inputs)
        answers.append(answer(model, processor, picture, "What is drawn?", 4, max_new_tokens=4))
        with torch.no_grad():
            new = model.generate(**inputs, scale=4, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        answers.append(new.tolist())
    # Qwen and Gemma 3 resize to 32x32 px: Qwen's 4-px patches merged 2x2 (a 4x4 grid), Gemma 3's projector pooling
    # to 4x4; OneVision's anyres crops of the 40x40 picture count as training counts them.
    anyres = preset == "tiny-llava-onevision"
    tokens = built.family.scale_tokens(built.model.config, None, (40, 40)) if anyres else 16
    assert int((prompts[0]["input_ids"] == built.image_token_id).sum()) == tokens
    extra = {"tiny-gemma3": (), "tiny-llava-onevision": ("image_sizes",)}.get(preset, ("image_grid_thw",))
    assert tuple(prompts[0]) == ("input_ids", "attention_mask", "pixel_values", *extra)
    if "image_grid_thw" in extra:
        assert prompts[0]["image_grid_thw"].tolist() == [[1, 8, 8]]
    for name, value in prompts[0].items():
        torch.testing.assert_close(value, prompts[1][name], rtol=0, atol=0)
    assert answers[0] == answers[2] and answers[1] == answers[3] and len(answers[1][0]) == 4


@pytest.mark.parametrize("preset", ["tiny-llava-onevision", "tiny-qwen2.5-vl"])
def test_an_export_names_the_processor_it_cannot_build_without_torchvision(tmp_path, preset):
    """OneVision's and Qwen's processor classes need torchvision (their video processors): the export writes their
    processor_config.json by hand (class, and OneVision's token count, which its default leaves unset), beside the
    tokenizer's chat_template.jinja and the image processor, so that AutoProcessor builds the right processor where
    torchvision is installed. Here, without it, AutoProcessor gets as far as the video processor."""
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    from mtrain.checkpoint.export import _save_hf_folder

    built = build_model(load_config(None, [f"model.preset={preset}"]).model, torch.float32, None, seed=0)
    folder = tmp_path / "model"
    _save_hf_folder(built.model, built, folder)
    written = json.loads((folder / "processor_config.json").read_text())
    if preset == "tiny-llava-onevision":  # each crop's tower grid
        config = built.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        assert written == {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": side * side,
                           "vision_feature_select_strategy": config.vision_feature_select_strategy,
                           "vision_aspect_ratio": config.vision_aspect_ratio}  # fmt: skip
    else:
        assert written == {"processor_class": "Qwen2_5_VLProcessor"}
    processor_class = getattr(__import__("transformers"), written["processor_class"])
    arguments, _ = processor_class.get_processor_dict(folder)
    assert (
        arguments["chat_template"]
        == AutoTokenizer.from_pretrained(folder).chat_template
        == built.tokenizer.chat_template
    )
    if is_torchvision_available():
        processor = AutoProcessor.from_pretrained(folder)
        assert type(processor).__name__ == written["processor_class"]
        assert all(getattr(processor, name) == value for name, value in written.items() if name != "processor_class")
    else:
        with pytest.raises(ImportError, match="VideoProcessor requires the Torchvision library"):
            AutoProcessor.from_pretrained(folder)
