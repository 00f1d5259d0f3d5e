"""Generated-answer accuracy per visual-token scale: greedy answers to held-out prompts, on every rank.

    held-out batch ──► prompts: each row up to its first learned token (the first assistant answer,
                       or a caption's text), left-padded; references: that first run of learned tokens
                   ──► per scale: MatryoshkaModel.generate (mtrain.infer: the scaled inputs an export
                       runs, the pooled visual tokens spliced in once, at prefill; then the KV cache)
                   ──► correct when the decoded answer equals the decoded reference (`same_answer`)
                   ──► (correct, answers) per scale ──► one all-reduce: counts exact on any world size

Under ZeRO-3 every forward gathers parameters collectively, so every rank must run as many forwards
as the others: transformers' `generate(synced_gpus=True)` keeps a rank whose answers have ended
stepping until every rank's have, and `held_out.lockstep` keeps a rank whose prompts ran out running
rounds (uncounted). The model is the training engine's own module in the in-loop evaluation and the
loaded weights in `mtrain eval`; an export goes through the same `MatryoshkaModel`.

The samples: the first `eval.generate_samples` of the held-out set over all ranks. The loader gives
rank r positions r, r+W, ... of the shard order, so rank r answers `len(range(r, N, W))` of its
share and any world size answers the same N samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipeline.collate import IMAGE_SIZES
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.config.schema import TrainConfig
from mtrain.eval.held_out import AllReduce, held_out_loader, lockstep, one_pass
from mtrain.infer import MatryoshkaModel, MatryoshkaSpec
from mtrain.launch.env import WorldInfo
from mtrain.task.token_layout import row_counts

# Per-scale sums of the generated answers.
GENERATION_SUMS = ("generated_correct", "generated_answers")


@dataclass
class AnswerPrompts:
    """The prompts of some held-out rows and the answers they should get."""

    inputs: dict[str, Any]
    """`input_ids` and `attention_mask` (left-padded, every image at the full grid) and the prompts' `pixel_values`
    (None without an image; `prompt_batches` gives them as the family's processor does, with Qwen's
    `image_grid_thw`), with their `image_sizes` when the batch has them (anyres crops by them): what
    `MatryoshkaModel.generate` takes."""
    references: list[list[int]]
    """Each row's first answer: its first run of learned tokens (the end-of-text token included)."""


def answer_prompts(batch: dict[str, Any], image_token_id: int, visual_tokens: int, pad_token_id: int,
                   rows: int) -> AnswerPrompts:  # fmt: skip
    """The first `rows` rows of a loader batch cut before their first answer, with the answers they hold."""
    tokens, images = row_counts(batch, image_token_id, visual_tokens, pad_token_id)
    ids, labels = batch["input_ids"][:rows].tolist(), batch["labels"][:rows].tolist()
    prompts, references, pixels, sizes = [], [], [], []
    batch_sizes = batch.get(IMAGE_SIZES) or []  # each image's (height, width): anyres crops by it
    for row in range(rows):
        learned = [i for i in range(tokens[row]) if labels[row][i] != IGNORE_INDEX]
        if not learned:
            raise ValueError(f"held-out row {row} has no learned token, so no answer to compare with")
        start = max(learned[0], 1)  # a row's first token is never a target: it is the shortest prompt
        end = next((i for i in range(start, tokens[row]) if labels[row][i] == IGNORE_INDEX), tokens[row])
        prompts.append(ids[row][:start])
        references.append(ids[row][start:end])
        # The images of the prompt: the first ones of the row (its later images follow the answer).
        first = sum(images[:row])
        shown = prompts[-1].count(image_token_id) // visual_tokens
        pixels += [batch["pixel_values"][first + i] for i in range(shown)]
        sizes += [batch_sizes[first + i] for i in range(shown) if batch_sizes]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "pixel_values": torch.stack(pixels) if pixels else None}  # fmt: skip
    if sizes:
        inputs[IMAGE_SIZES] = torch.tensor(sizes, dtype=torch.long)
    return AnswerPrompts(inputs, references)


def same_answer(generated: list[int], reference: list[int], tokenizer: Any, eos_token_id: int) -> bool:
    """Exact match of the texts, special tokens dropped and surrounding whitespace stripped; the generated
    answer ends at its first end-of-text token (the reference ends there too)."""
    if eos_token_id in generated:
        generated = generated[: generated.index(eos_token_id)]
    decode = tokenizer.decode
    return decode(generated, skip_special_tokens=True).strip() == decode(reference, skip_special_tokens=True).strip()


def generation_model(cfg: TrainConfig, task: torch.nn.Module, routing: Any) -> MatryoshkaModel:
    """The task's model run as `mtrain.infer` runs an export of it: the same spec, its scale adapters (if any)
    chosen through the training model's `routing` (`BuiltModel.scale_routing`). Switches the model to eval
    mode: in a training job, build it inside `evaluation_mode`."""
    from mtrain.checkpoint.export import matryoshka_metadata  # noqa: PLC0415

    return MatryoshkaModel(task.model, MatryoshkaSpec.from_block(matryoshka_metadata(cfg)), routing=routing)


def rank_quota(samples: int, world: WorldInfo) -> int:
    """This rank's part of the first `samples` held-out samples (it reads positions r, r+W, ... of them)."""
    return len(range(world.rank, samples, world.world_size))


def prompt_batches(batches: Iterator[dict[str, Any]], quota: int, built: Any) -> Iterator[AnswerPrompts]:
    """The prompts of this rank's first `quota` held-out samples, a loader batch at a time."""
    left = quota
    while left > 0:  # no batch read past the quota: each one decodes its images
        batch = next(batches, None)
        if batch is None:
            return
        rows = min(left, batch["input_ids"].shape[0])
        left -= rows
        prompts = answer_prompts(batch, built.image_token_id, built.visual_tokens, built.tokenizer.pad_token_id, rows)
        pixels = prompts.inputs.pop("pixel_values")
        if pixels is not None:  # as the family's processor gives them (Qwen: one patch sequence, image_grid_thw)
            prompts.inputs |= built.family.prompt_images(built.model.config, pixels, built.visual_grid)
        else:
            prompts.inputs["pixel_values"] = None
        yield prompts


def blank_image_pass(model: MatryoshkaModel, grid: tuple[int, int] | None) -> None:
    """The vision path on one blank image (of merged grid `grid`, as the loader gives it), its output dropped:
    a rank whose prompts have no image still gathers the vision tower's parameters when the others do (ZeRO-3
    collectives must match)."""
    from mtrain.model.families import family_for  # noqa: PLC0415

    config = model.llava.config
    family = family_for(config.model_type)
    device = model.llava.get_input_embeddings().weight.device
    pixels, sizes = family.stand_in_input(config, grid, model.llava.dtype, device)
    images = family.prompt_images(config, pixels, grid)
    model.visual_at_scale(images["pixel_values"], images.get("image_grid_thw"), None, sizes)


def generate_answers(
    model: MatryoshkaModel,
    rounds: Iterator[tuple[AnswerPrompts, bool]],
    to_device: Callable[[dict[str, Any]], dict[str, Any]],
    scales: list[int],
    tokenizer: Any,
    max_new_tokens: int,
    synced: bool,
    grid: tuple[int, int] | None = None,
) -> dict[int, torch.Tensor]:
    """This rank's (correct, answers) per scale over its rounds of prompts; `synced`: ranks step together;
    `grid`: the loader's merged image grid (`BuiltModel.visual_grid`)."""
    sums = {scale: torch.zeros(len(GENERATION_SUMS), dtype=torch.float64) for scale in scales}
    for prompts, counted in rounds:
        inputs = to_device(prompts.inputs)
        for scale in scales:
            answers = answer_batch(model, inputs, scale, tokenizer, max_new_tokens, synced, grid)
            if counted:
                eos = tokenizer.eos_token_id
                right = sum(same_answer(a, r, tokenizer, eos) for a, r in zip(answers, prompts.references, strict=True))
                sums[scale] += torch.tensor([right, len(answers)], dtype=torch.float64)
    return sums


def answer_batch(model: MatryoshkaModel, inputs: dict[str, Any], scale: int, tokenizer: Any, max_new_tokens: int,
                 synced: bool, grid: tuple[int, int] | None = None) -> list[list[int]]:  # fmt: skip
    """The greedy new tokens of every prompt row at `scale`. `synced` (several ranks, ZeRO-3): this rank keeps
    stepping (its forwards' outputs unused) until every rank's answers have ended, and runs the vision path even
    when its prompts have no image (on a blank image of the loader's merged grid `grid`)."""
    if synced and inputs["pixel_values"] is None:
        blank_image_pass(model, grid)
    new = model.generate(**inputs, scale=scale, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return new.tolist()


def generated_answer_sums(
    cfg: TrainConfig,
    built: Any,
    model: MatryoshkaModel,
    world: WorldInfo,
    shards: str | None,
    scales: list[int],
    to_device: Callable[[dict[str, Any]], dict[str, Any]],
    all_reduce: AllReduce,
) -> dict[int, torch.Tensor]:
    """(correct, answers) per scale over the first `eval.generate_samples` held-out samples, summed over every
    rank; every rank calls it (its own pass over the held-out shards: no training data position moves)."""
    from mtrain.eval.budget import reduce_sums  # noqa: PLC0415

    if cfg.eval.generate_samples < world.world_size:
        raise ValueError(
            f"eval.generate_samples={cfg.eval.generate_samples} leaves some of the {world.world_size} ranks no "
            f"sample to answer, and every rank takes part in each generation; give at least {world.world_size}"
        )
    quota = rank_quota(cfg.eval.generate_samples, world)
    prompts = prompt_batches(one_pass(held_out_loader(cfg, built, world, shards)), quota, built)
    rounds = lockstep(prompts, all_reduce, world.world_size)
    synced = world.world_size > 1
    sums = generate_answers(model, rounds, to_device, scales, built.tokenizer, cfg.eval.max_new_tokens, synced,
                            built.visual_grid)  # fmt: skip
    return reduce_sums(sums, all_reduce)


def generated_accuracy(sums: dict[int, torch.Tensor]) -> dict[int, tuple[float, int]]:
    """(accuracy, answers) per scale from the sums over every rank."""
    return {scale: (float(values[0]) / max(float(values[1]), 1.0), int(values[1])) for scale, values in sums.items()}


def generated_metrics(sums: dict[int, torch.Tensor]) -> dict[str, float]:
    """`eval/generated_accuracy/scale_<s>` and the answers it counts, from the sums over every rank."""
    out: dict[str, float] = {}
    for scale, (accuracy, answers) in sorted(generated_accuracy(sums).items()):
        out[f"eval/generated_accuracy/scale_{scale}"] = accuracy
        out[f"eval/generated_answers/scale_{scale}"] = float(answers)
    return out


# ── `mtrain generate`: one answer, for a quick look ────────────────────────────────────────────
def load_generator(source: str | Path) -> tuple[MatryoshkaModel, Any]:
    """(model, processor) of an export folder (through `MatryoshkaModel.from_export`, as users load it) or of a
    checkpoint (its weights consolidated as `mtrain eval` loads them, its processor as the export writes it)."""
    from mtrain.checkpoint.export import EXPORT_METADATA  # noqa: PLC0415
    from mtrain.infer import load_processor  # noqa: PLC0415

    folder = Path(source)
    if (folder / EXPORT_METADATA).is_file():
        model = MatryoshkaModel.from_export(folder)
        model.check_generates()  # before the processor, whose loading may fail first
        return model, load_processor(folder / "model", model.llava.config)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{source} is not a folder: give an export (the folder holding {EXPORT_METADATA}) or a checkpoint "
            "(a step_XXXXXXXX folder, a checkpoints folder or a run folder)"
        )
    from mtrain.eval.budget import load_for_eval  # noqa: PLC0415

    cfg, built, task = load_for_eval(folder, [], shards=None, data_needed=False)
    return checkpoint_generator(cfg, built, task, source)


def checkpoint_generator(cfg: TrainConfig, built: Any, task: Any, source: str | Path) -> tuple[MatryoshkaModel, Any]:
    """(model, processor) of a loaded checkpoint's task: the processor its export writes (LLaVA's), or for
    Qwen-VL, OneVision and Gemma 3 its tokenizer and image processor as `mtrain.infer.load_processor` reads them
    from the export."""
    from mtrain.checkpoint.export import llava_processor  # noqa: PLC0415
    from mtrain.infer import PROMPT_BUILT_MODEL_TYPES, ImagePromptProcessor  # noqa: PLC0415

    model = generation_model(cfg, task, built.scale_routing)
    model.check_generates()
    config = task.llava.config
    if config.model_type in PROMPT_BUILT_MODEL_TYPES:
        return model, ImagePromptProcessor(built.tokenizer, exported_image_processor(built.image_processor), config)
    processor = llava_processor(config, built, built.tokenizer.chat_template)
    if processor is None:
        raise ValueError(
            f"{source}: mtrain builds no processor for a {config.model_type} checkpoint; export it "
            "(mtrain export) and run mtrain generate on the export, which holds the model's own processor"
        )
    return model, processor


def exported_image_processor(image_processor: Any) -> Any:
    """The image processor as an export holds it, saved and loaded back (training's fixed-size wrapper of Qwen's
    saves the stock one: an export's users resize as it does)."""
    import tempfile  # noqa: PLC0415

    from transformers import AutoImageProcessor  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as folder:
        image_processor.save_pretrained(folder)
        return AutoImageProcessor.from_pretrained(folder)


def check_generation_scale(spec: MatryoshkaSpec, scale: int | None) -> None:
    """Refuse a scale the model never trained at: its answer would say nothing about the model."""
    if scale is None:
        return
    if not spec.scales:
        raise ValueError(f"--scale {scale}: this model was trained at the full grid only; leave --scale out")
    if scale not in spec.scales:
        raise ValueError(f"--scale {scale}: this model was trained at the visual-token scales {spec.scales}; pick one")


def run_generate(source: str, image: str, prompt: str, scale: int | None, max_new_tokens: int) -> str:
    """`mtrain generate`: the greedy answer of a checkpoint or an export to `prompt` about `image`, at `scale`."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    from mtrain.infer import answer  # noqa: PLC0415

    if not Path(image).is_file():
        raise FileNotFoundError(f"--image {image}: no such file")
    try:
        picture = Image.open(image).convert("RGB")
    except UnidentifiedImageError as exc:
        raise ValueError(f"--image {image}: not a picture PIL can read ({exc})") from exc
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    model, processor = load_generator(source)
    check_generation_scale(model.spec, scale)
    with torch.no_grad():
        return answer(model, processor, picture, prompt, scale, max_new_tokens)
