"""Model FLOPs of one trained sample, from the model's shapes and parameter counts.

Conventions (PaLM appendix B, Megatron-LM and torchtitan MFU):

    language model, per token   forward            2 N        N: parameters in matmuls (decoder layers,
                                backward, inputs   2 N           final norm, lm_head; the input embedding
                                backward, weights  2 N_t         is a lookup, not a matmul)
                                                               N_t: the LM base weights that train
                                                               (all of them: the usual 6 N; LoRA: 0)
    causal attention, per segment of l tokens      6 L d l^2   (QK^T and AV: 2 x 2 d l^2 / 2 forward, x3)
    vision tower, per image     2 N_v T + 4 L_v d_v T^2, x3 when it trains (T: patches + CLS)
    projector, per image        2 N_p G, + 2 N_p G per trained side (G: patch-grid tokens)

Model FLOPs count no recomputation (activation checkpointing, flash-attention's backward) and leave
LoRA adapters out (2 r (d_in + d_out) per adapted matrix: under 1% at r <= 64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mtrain.config.schema import TokenScalesConfig, TrainConfig
from mtrain.model.build import model_part, visual_tokens_per_image
from mtrain.model.families import ModelFamily


@dataclass(frozen=True)
class ModelShape:
    """What FLOPs and memory depend on; built from a (meta or live, ZeRO-3 partitioned) model."""

    hidden: int
    layers: int
    kv_dim: int  # key/value width: kv_heads x head_dim (= hidden without grouped-query attention)
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_intermediate: int
    vision_sequence: int  # tokens through the vision tower per pass: patches (+ CLS)
    grid_tokens: int  # patch-grid tokens the projector reads per image
    visual_tokens: int  # tokens each image gives the language model at full scale (grid, or M for MQT)
    lm_params: int  # language-model parameters in matmuls (see the module docstring)
    lm_trained_params: int  # of which base weights train (LoRA adapters excluded)
    vision_params: int
    vision_trained: bool
    projector_params: int
    projector_trained: bool
    total_params: int  # every parameter held: adapters and PEFT's frozen module copies included
    trainable_params: int
    largest_layer_params: int  # the largest module's own parameters (ZeRO-3 gathers it whole)
    vision_passes: int = 1  # tower passes per image: 1, or crops + base image for anyres (LLaVA-OneVision)
    image_note: str = ""  # how the image was planned, for a family whose token count depends on the image
    param_numels: tuple[int, ...] = ()  # every parameter's elements (ZeRO-3 keeps small ones whole on every rank)


@dataclass(frozen=True)
class ImageGeometry:
    """How one image goes through the vision tower and projector into the language model."""

    vision_sequence: int  # tokens through the tower per pass
    grid_tokens: int  # tokens the projector reads per pass
    visual_tokens: int  # tokens the image gives the language model at full scale
    passes: int = 1  # tower passes per image
    note: str = ""


# Families whose visual tokens depend on the image are planned at one stated image size.
ONEVISION_PLANNED_CROPS = 2  # LLaVA-OneVision anyres: a 768 x 768 px image -> 2 x 2 crops of 384 px + the base image


def image_geometry(config: Any, visual_tokens: int) -> ImageGeometry:
    """The tower's, projector's and language model's tokens of one image, as each family counts them
    (`visual_tokens`: the family's own count, used for LLaVA-1.5-style fixed grids and MQT's queries)."""
    vision = config.vision_config
    # Qwen's images are resized to model.image_size: a fixed merged grid.
    if config.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        patches = visual_tokens * vision.spatial_merge_size**2
        return ImageGeometry(patches, patches, visual_tokens)
    grid = (vision.image_size // vision.patch_size) ** 2
    if config.model_type == "llava_onevision":
        crops, side = ONEVISION_PLANNED_CROPS, vision.image_size // vision.patch_size
        # anyres: the crops' grids joined (crops*side)^2 plus one image-newline token per row, then the base image
        tokens = (crops * side) ** 2 + crops * side + grid
        note = (f"{crops * vision.image_size} x {crops * vision.image_size} px images: {crops} x {crops} crops of "
                f"{vision.image_size} px + the base image, {grid} tokens each, {crops * side} newline tokens")  # fmt: skip
        return ImageGeometry(grid, grid, tokens, crops * crops + 1, note)
    return ImageGeometry(grid + 1, grid, visual_tokens)


def model_shape(model: nn.Module, visual_tokens: int, parts: dict[str, str] | None = None) -> ModelShape:
    """Shapes from the LLaVA config and parameter counts from `model` (a LlavaForConditionalGeneration,
    possibly PEFT-wrapped). Works on the meta device and on ZeRO-3 partitioned parameters."""
    text, vision = model.config.text_config, model.config.vision_config
    parts = parts or ModelFamily.part_names
    image = image_geometry(model.config, visual_tokens)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    counts = {"language_model": 0, "lm_trained": 0, "vision_tower": 0, "projector": 0}
    trained_parts: set[str] = set()
    total = trainable = 0
    numels = []
    for name, param in model.named_parameters():
        numel = getattr(param, "ds_numel", param.numel())
        numels.append(numel)
        total += numel
        trainable += numel if param.requires_grad else 0
        if "lora_" in name or "original_module" in name:
            continue  # adapters are left out of FLOPs; PEFT's frozen original of a trained module never runs
        part = model_part(name, parts)
        if param.requires_grad:
            trained_parts.add(part)
        if part == "language_model" and "embed_tokens" in name:
            continue
        counts[part] += numel
        if part == "language_model" and param.requires_grad:
            counts["lm_trained"] += numel
    largest = max(
        sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters(recurse=False)) for module in model.modules()
    )
    # Qwen2-VL's tower is `embed_dim` wide over `depth` blocks (its `hidden_size` is the merger's output).
    vision_hidden = getattr(vision, "embed_dim", None) or vision.hidden_size
    return ModelShape(
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        kv_dim=(getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        vision_hidden=vision_hidden,
        vision_layers=getattr(vision, "depth", None) or vision.num_hidden_layers,
        vision_intermediate=getattr(vision, "intermediate_size", None) or int(vision_hidden * vision.mlp_ratio),
        vision_sequence=image.vision_sequence,
        grid_tokens=image.grid_tokens,
        visual_tokens=image.visual_tokens,
        lm_params=counts["language_model"],
        lm_trained_params=counts["lm_trained"],
        vision_params=counts["vision_tower"],
        vision_trained="vision_tower" in trained_parts,
        projector_params=counts["projector"],
        projector_trained="projector" in trained_parts,
        total_params=total,
        trainable_params=trainable,
        largest_layer_params=largest,
        vision_passes=image.passes,
        image_note=image.note,
        param_numels=tuple(numels),
    )


def sample_layouts(tokens: TokenScalesConfig, visual_tokens: int, text_tokens: int) -> list[list[int]]:
    """Equally likely layouts of one sample in the language model, each a list of attention segments.

    Policy `all` trains every scale on every sample, the text repeated once per scale (packed layout:
    one row, block-diagonal attention); the sampling policies draw one scale uniformly.
    """
    if tokens.mode == "none":
        return [[text_tokens + visual_tokens]]
    if tokens.mode == "mqt" and tokens.mqt_stage == 1:
        return [[text_tokens + tokens.mqt_queries]]
    if tokens.policy == "all":
        return [[text_tokens + scale for scale in tokens.scales]]
    return [[text_tokens + scale] for scale in tokens.scales]


def lm_flops_per_token(shape: ModelShape) -> float:
    """Dense (non-attention) training FLOPs per language-model token."""
    return 2 * shape.lm_params + 2 * shape.lm_params + 2 * shape.lm_trained_params


def attention_flops(shape: ModelShape, segment: int) -> float:
    """Training FLOPs of causal attention over one segment of `segment` tokens, all layers."""
    return 6 * shape.layers * shape.hidden * segment**2


def image_flops(shape: ModelShape) -> float:
    """Training FLOPs of the vision tower and projector for one image."""
    sequence = shape.vision_sequence
    tower = 2 * shape.vision_params * sequence + 4 * shape.vision_layers * shape.vision_hidden * sequence**2
    projector = 2 * shape.projector_params * shape.grid_tokens
    projector_passes = 1 + int(shape.projector_trained) + int(shape.vision_trained)
    return shape.vision_passes * (tower * (3 if shape.vision_trained else 1) + projector * projector_passes)


def sample_flops(shape: ModelShape, segments: list[int], images: int = 1) -> float:
    """Training FLOPs of one sample laid out as `segments` (see `sample_layouts`)."""
    lm = sum(segments) * lm_flops_per_token(shape) + sum(attention_flops(shape, s) for s in segments)
    return lm + images * image_flops(shape)


def mean_sample_flops(shape: ModelShape, layouts: list[list[int]]) -> float:
    return sum(sample_flops(shape, segments) for segments in layouts) / len(layouts)


def mean_sample_tokens(layouts: list[list[int]]) -> float:
    return sum(sum(segments) for segments in layouts) / len(layouts)


def flops_per_token(shape: ModelShape, tokens: TokenScalesConfig, text_tokens: int) -> float:
    """Training FLOPs per counted language-model token (vision and projector work included)."""
    layouts = sample_layouts(tokens, shape.visual_tokens, text_tokens)
    return mean_sample_flops(shape, layouts) / mean_sample_tokens(layouts)


def trainer_flops_per_token(cfg: TrainConfig, task: nn.Module) -> float:
    """FLOPs per counted token of a running task (`task.model` the MLLM, ZeRO-3 partitioned or not),
    its samples laid out as planned with text filling `data.max_len`."""
    tokens = cfg.matryoshka.tokens
    # The task's count where it has one (a Qwen2-VL image's depends on its size, not on the config).
    visual = getattr(task, "visual_tokens", None) or visual_tokens_per_image(task.model.config)
    visual = tokens.mqt_queries if tokens.mode == "mqt" else visual
    shape = model_shape(task.model, visual, getattr(getattr(task, "family", None), "part_names", None))
    return flops_per_token(shape, tokens, max(cfg.data.max_len - visual, 0))
