"""Qwen2-VL (`model_type == "qwen2_vl"`): native-resolution grids, the patch merger, 3-D M-RoPE.

- Images -> grids: the processor cuts each image into patch_size x patch_size patches (two copies of
  the image as Qwen's temporal_patch_size=2 frames), flattened to (patches, 3 * 2 * patch_size^2)
  rows ordered so that every merge_size x merge_size block is consecutive; the tower's patch
  merger (the projector, `model.visual.merger`) joins each block into one token. So one image is a
  (t, rows, columns) grid of merged tokens, rows = h / merge_size and columns = w / merge_size for
  `image_grid_thw` (t, h, w), row-major. Either every image is resized to one configured (height,
  width) (`FixedSizeImageProcessor`: Qwen's own processor after the resize; the tiny preset uses
  tiny.image_size square), so every image has the same known merged grid `BuiltModel.visual_grid` and
  every `<image>` the same number of tokens (non-square sizes are allowed); or, at native resolution
  (`model.image_pixels`, `NativeSizeImageProcessor`), each image keeps its aspect ratio within
  [min_pixels, max_pixels], its sides multiples of patch_size * merge_size * every M3 factor, and the
  batch carries its own `image_grid_thw` row (`data_pipeline.collate.IMAGE_GRID_THW`).
- M3 on such grids: a scale is a pooling factor f per side, the same for both sides; the image
  gives (rows / f) x (columns / f) tokens. Scales are written as those token counts (s =
  rows * columns / f^2, `mtrain.model.token_scales.grid_factor`). Factors nest (f = 1, 2, 4: each
  grid pools the one before), every rank computes the same counts from the same grid, and f must
  divide both sides of the merged grid (size each side a multiple of patch_size * merge_size * f_max).
  At native resolution a scale is a count on the reference grid of R = max_pixels / (patch_size *
  merge_size)^2 tokens (`token_scales.reference_factor`: f = sqrt(R / s)), and every image is pooled by
  that f to its own (t, h / f, w / f) grid; the layout keeps each image's count (`token_layout.ImageGrids`)
  and the M-RoPE ids come from each image's pooled grid in layout order (`per_image_position_ids`).
- Sequence: the pooled tokens fill the positions of `image_token_id` (`<|image_pad|>`) between
  `<|vision_start|>` and `<|vision_end|>`, (rows / f) * (columns / f) of them per image. The chat
  template writes the markers into conversations; captions and interleaved documents get them from
  tokenization (`image_markers`), as Qwen's processor has them, unlearned like the image's tokens.
  They also keep two adjacent images two runs for `get_rope_index`, which groups image tokens by runs.
- Position ids: 3-D M-RoPE (temporal, height, width), from the model's own `get_rope_index`
  given the pooled grid, (t, h / f, w / f): pooled tokens get the positions of a grid of that
  size, and the text after an image continues from the pooled grid's extent. They are computed per
  document (each from 0, as the document alone would get them) and placed into the packed row;
  packed, the 1-D per-document positions go first as the fourth row transformers reads its
  block-diagonal mask from (`Qwen2VLTextModel.forward`), so attention never crosses documents.
- Objectives: next-token training with M3 (`matryoshka.tokens.mode=m3`) or without (`none`: the
  language-modeling task, every image at full size, the same M-RoPE ids). MQT (`mode=mqt`): a query
  transformer after the merger reads each image's merged tokens (`mtrain/model/mqt_head.py`); its
  query tokens take text ids, all three axes the 1-D id (`layout_position_ids(query_tokens=True)`):
  a query is no image location, and text ids keep the first m queries' ids the same at every scale.
  The contrastive task: every image at full size, M-RoPE ids from `get_rope_index` as here (at native
  resolution from each image's own grid, the pair batch's `{side}_image_grid_thw`).

`qwen2_5_vl` (`Qwen2_5_VLFamily`) reuses all of this: its tower adds window attention, with the
same merger, image token and M-RoPE. `qwen3_vl` (`qwen3_vl.py`) subclasses it and adds DeepStack
(tower features added in the first language-model layers, pooled as the main tokens are).

Not yet: MQT and generation at native resolution (refused at config load), and a saved `Qwen2VLProcessor`
in exports (its video processor needs torchvision, which the CPU stack leaves out).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from data_pipeline.chat_template import message_text_template
from mtrain.model.families.base import ModelFamily, tiny_text_sizes

# merged_grid and pool_merged (Qwen's M3 pooling, mtrain/model/token_scales.py) are imported from here too.
from mtrain.model.token_scales import (  # noqa: F401
    grid_factor,
    merged_grid,
    pool_merged,
    pooled_grid_thw,
    reference_factor,
)

IMAGE_PAD = "<|image_pad|>"  # the image token: one per visual token in the sequence
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"  # around every image's run of IMAGE_PAD
# Qwen2-VL's special tokens, as its tokenizer has them (the tiny preset's tokenizer carries the same).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    "<|video_pad|>",
]
SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL's chat template (ChatML with a default system prompt; an image part is
# <|vision_start|><|image_pad|><|vision_end|>), with its assistant parts marked by {% generation %}
# so `apply_chat_template(..., return_assistant_tokens_mask=True)` gives the mask training uses.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    + message_text_template(VISION_START + IMAGE_PAD + VISION_END)
    + "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- text + '<|im_end|>\\n' -}}{%- endgeneration -%}"
    "{%- else -%}{{- text + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def factor_problems(grids: list[tuple[int, int, int]], factors: list[int]) -> list[str]:
    """Each pooling factor must divide both sides of every image's merged grid."""
    bad = sorted({(f, rows, columns) for f in factors for _, rows, columns in grids if rows % f or columns % f})
    return [f"pooling factor {f} does not divide a {rows}x{columns} merged grid" for f, rows, columns in bad]


def build_tiny_qwen_tokenizer(vocab_size: int = 512, chat_template: str = CHAT_TEMPLATE) -> Any:
    """The tiny preset's tokenizer in Qwen2-VL's shape: its special tokens, no BOS, `<|im_end|>` ending a
    turn, `<|endoftext|>` padding, and `chat_template` (default: Qwen2-VL's)."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    from mtrain.model.tokenizer import train_tiny_bpe  # noqa: PLC0415

    return PreTrainedTokenizerFast(
        tokenizer_object=train_tiny_bpe(SPECIAL_TOKENS, vocab_size),
        chat_template=chat_template,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_PAD},
    )


def tiny_qwen2_vl_config(tiny: Any, vocab_size: int, tokenizer: Any) -> Any:
    """The tiny preset's Qwen2VLConfig: a small Qwen2 language model with M-RoPE and a small Qwen2-VL tower
    (patch `tiny.patch_size`, 2x2 merger)."""
    from transformers import Qwen2VLConfig  # noqa: PLC0415

    # M-RoPE splits head_dim / 2 rotary frequencies into (temporal, height, width) sections, in
    # Qwen2-VL's proportions (16, 24, 24 of 64).
    half = tiny.hidden_size // tiny.num_heads // 2
    temporal = half // 4
    height = (half - temporal) // 2
    text = {
        **tiny_text_sizes(tiny, vocab_size),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [temporal, height, half - temporal - height],
        },
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    vision = {
        "depth": tiny.vision_layers,
        "embed_dim": tiny.vision_hidden_size,
        "hidden_size": tiny.hidden_size,
        "num_heads": max(1, tiny.vision_hidden_size // 8),
        "mlp_ratio": 2,
        "patch_size": tiny.patch_size,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids(tokenizer))


def tiny_qwen_tower_sizes(tiny: Any) -> dict[str, Any]:
    """The vision-config sizes the tiny Qwen2.5-VL and Qwen3-VL towers share (RMSNorm/SwiGLU blocks whose
    merger projects to the language model's width)."""
    return {
        "depth": tiny.vision_layers,
        "hidden_size": tiny.vision_hidden_size,
        "intermediate_size": tiny.vision_hidden_size * 2,
        "num_heads": max(1, tiny.vision_hidden_size // 8),
        "out_hidden_size": tiny.hidden_size,
        "patch_size": tiny.patch_size,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }


def tiny_qwen2_5_vl_config(tiny: Any, vocab_size: int, tokenizer: Any) -> Any:
    """The tiny preset's Qwen2_5_VLConfig: the same language model as `tiny_qwen2_vl_config`, and a
    Qwen2.5-VL tower: RMSNorm and SwiGLU blocks with window attention over 2x2 merged-token windows,
    full attention in its last block."""
    from transformers import Qwen2_5_VLConfig  # noqa: PLC0415

    text = tiny_qwen2_vl_config(tiny, vocab_size, tokenizer).text_config.to_dict()
    for name in ("model_type", "architectures", "transformers_version"):
        text.pop(name, None)
    vision = {
        **tiny_qwen_tower_sizes(tiny),
        "window_size": tiny.patch_size * MERGE_SIZE * 2,  # windows of 2x2 merged tokens (pixels per side)
        "fullatt_block_indexes": [tiny.vision_layers - 1],
    }
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids(tokenizer))


def token_ids(tokenizer: Any) -> dict[str, int]:
    """The config's image, video and vision start/end token ids, from the tokenizer."""
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in TOKEN_IDS.items()}


MERGE_SIZE = 2  # Qwen2-VL's patch merger joins 2x2 patches
TOKEN_IDS = {
    "image_token_id": IMAGE_PAD,
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}


class FixedSizeImageProcessor:
    """Qwen2-VL's own image processor, after resizing every image to one (height, width) in pixels.

    Qwen's processor keeps each image's aspect ratio (`smart_resize`), so grids vary per image;
    this first cut gives every image the same merged grid (height / (patch * merge), width / (patch * merge)).
    Called as an image processor on one image, it returns that image's flattened patches with a leading
    batch axis of one: (1, patches, 3 * temporal_patch_size * patch_size^2), which the loader stacks
    into (images, patches, dim). Saving saves the stock processor (what inference loads).
    """

    def __init__(self, processor: Any, height: int, width: int) -> None:
        unit = processor.patch_size * processor.merge_size
        if height % unit or width % unit:
            raise ValueError(
                f"a {height}x{width} image size for a Qwen2-VL model: each side must be a multiple of "
                f"patch_size * merge_size = {unit}"
            )
        self.processor = processor
        self.height = height
        self.width = width

    @property
    def merged_grid(self) -> tuple[int, int]:
        """(rows, columns) of merged tokens every image becomes."""
        unit = self.processor.patch_size * self.processor.merge_size
        return self.height // unit, self.width // unit

    def __call__(self, images: Any, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        from PIL import Image  # noqa: PLC0415

        image = images.convert("RGB").resize((self.width, self.height), resample=Image.BICUBIC)
        out = self.processor(images=image, do_resize=False, return_tensors="pt")
        return {"pixel_values": out["pixel_values"][None], "image_grid_thw": out["image_grid_thw"]}

    def save_pretrained(self, folder: Any, **kwargs: Any) -> Any:
        return self.processor.save_pretrained(folder, **kwargs)


class NativeSizeImageProcessor:
    """Qwen2-VL's own image processor at native resolution: each image keeps its aspect ratio and about its size.

    The resize is Qwen's `smart_resize` (sides rounded to a multiple of a factor, the pixel count brought within
    [min_pixels, max_pixels]), with the factor patch_size * merge_size * `pooling`, the least common multiple of
    the M3 pooling factors: every factor then divides both sides of every image's merged grid. With `pooling` 1
    it is the stock processor's own resize. Called on one image it returns that image's flattened patches,
    (patches, 3 * temporal_patch_size * patch_size^2), and its `image_grid_thw` row; the loader joins a batch's
    images into one sequence of patches (`variable_patches`). Saving saves the stock processor."""

    variable_patches = True  # images differ in patch count: the loader concatenates them (data_pipeline/images.py)

    def __init__(self, processor: Any, min_pixels: int, max_pixels: int, pooling: int = 1) -> None:
        self.processor = processor
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.factor = processor.patch_size * processor.merge_size * pooling
        if max_pixels < self.factor * self.factor:
            raise ValueError(
                f"model.image_pixels max_pixels={max_pixels} is below one {self.factor}x{self.factor} image, the "
                "smallest whose merged grid every M3 pooling factor divides; raise it"
            )

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # noqa: PLC0415

        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def size_tokens(self, size: tuple[int, int]) -> int:
        """Merged tokens of an image of (height, width) pixels before the resize: what `visual_tokens` gives for
        its `image_grid_thw`, known from the size alone (the loader reads it from the image's header)."""
        height, width = self.size_for(*size)
        unit = self.processor.patch_size * self.processor.merge_size
        return (height // unit) * (width // unit)

    def visual_tokens(self, grid_thw: list[int]) -> int:
        """Merged tokens of an image of `image_grid_thw` row (t, h, w) in patches."""
        t, h, w = grid_thw
        return t * h * w // self.processor.merge_size**2

    def __call__(self, images: Any, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        from PIL import Image  # noqa: PLC0415

        image = images.convert("RGB")
        height, width = self.size_for(image.height, image.width)
        resized = image.resize((width, height), resample=Image.BICUBIC)
        out = self.processor(images=resized, do_resize=False, return_tensors="pt")
        return {"pixel_values": out["pixel_values"][None], "image_grid_thw": out["image_grid_thw"]}

    def save_pretrained(self, folder: Any, **kwargs: Any) -> Any:
        return self.processor.save_pretrained(folder, **kwargs)


def pooling_multiple(factors: list[int]) -> int:
    """The least common multiple of M3's pooling factors: what every image side is a multiple of (in merged tokens)."""
    return math.lcm(1, *factors)


def tiny_qwen_image_processor(image_size: int, patch_size: int) -> FixedSizeImageProcessor:
    """Qwen2-VL's image processor (the PIL one: the default wants torchvision) at the tiny size: a square
    image of `image_size` pixels keeps that size under its own resize too (what inference gets)."""
    from transformers import Qwen2VLImageProcessorPil  # noqa: PLC0415

    pixels = image_size * image_size
    stock = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=MERGE_SIZE, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
    )
    return FixedSizeImageProcessor(stock, image_size, image_size)


def scale_problems(tokens: Any, fit: Callable[[int], int], size_rule: str) -> list[str]:
    """Each M3 scale that `fit` (its pooling factor on the grid, raising ValueError) refuses, named with the
    config's size rule."""
    found = []
    for scale in tokens.scales if tokens.mode == "m3" else []:
        try:
            fit(scale)
        except ValueError as exc:
            found.append(f"matryoshka.tokens.scales: {exc} ({size_rule})")
    return found


class Qwen2VLFamily(ModelFamily):
    model_type = "qwen2_vl"
    generates = True
    model_class_path = "transformers:Qwen2VLForConditionalGeneration"
    position_ids = "3-D M-RoPE from the model's get_rope_index, given each image's pooled grid (t, h / f, w / f)"
    part_names = {"vision_tower": "visual", "projector": "visual.merger"}
    image_markers = (VISION_START, VISION_END)  # Qwen's processor expands the pad between them
    # A text-only batch's blank image when images have no one grid (native resolution): one merged token.
    stand_in_grid = (1, 1)

    def visual_tokens(self, config: Any) -> int:
        raise NotImplementedError("qwen2_vl images have a token count each: rows * columns of their merged grid")

    def visual_grid(self, config: Any) -> tuple[int, int] | None:
        return None  # one grid per image, from its size (BuiltModel.visual_grid for a fixed size)

    def image_token_id(self, config: Any) -> int:
        return config.image_token_id

    def problems(self, config: Any, tokens: Any, image_size: list[int] | None = None) -> list[str]:
        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        if not image_size:
            return [
                f"a {self.model_type} model's images need a size rule; set model.image_size=[height,width] "
                f"(multiples of patch_size * merge_size = {unit} times the largest M3 pooling factor) for one size, "
                "or model.image_pixels=[min_pixels,max_pixels] for Qwen's native resolution"
            ]
        if image_size[0] % unit or image_size[1] % unit:
            return [f"model.image_size={image_size}: each side must be a multiple of patch_size * merge_size = {unit}"]
        grid = (image_size[0] // unit, image_size[1] // unit)
        return scale_problems(tokens, lambda scale: grid_factor(grid, scale), f"model.image_size={image_size}")

    def native_resolution_problems(self, config: Any, tokens: Any, image_pixels: list[int]) -> list[str]:
        """M3 scales that are no pooling factor of the reference grid, and what the family refuses whatever
        its images' sizes (its problems with one fitting size and no scales)."""
        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        reference = image_pixels[1] // (unit * unit)
        found = self.problems(config, dataclasses.replace(tokens, scales=[]), [unit, unit])
        fit = functools.partial(reference_factor, reference)
        return found + scale_problems(tokens, fit, f"model.image_pixels={image_pixels}")

    def patch_grid_thw(self, config: Any, grid: tuple[int, int], images: int, device: Any) -> torch.Tensor:
        """`image_grid_thw` rows (1, h, w) in patches for `images` images of merged grid `grid`."""
        merge = config.vision_config.spatial_merge_size
        rows, columns = grid
        return torch.tensor([[1, rows * merge, columns * merge]] * images, device=device)

    def image_features(
        self,
        model: Any,
        pixel_values: torch.Tensor,
        grid: tuple[int, int] | None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        if grid is None:
            raise ValueError(f"a {self.model_type} model needs its images' merged grid (BuiltModel.visual_grid)")
        grid_thw = self.patch_grid_thw(model.config, grid, pixel_values.shape[0], pixel_values.device)
        return torch.stack(self.grid_features(model, pixel_values.flatten(0, 1), grid_thw))

    def grid_features(self, model: Any, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Each image's merged tokens, (t * rows * columns, dim) row-major, for Qwen's flattened patches of
        every image in one sequence and their `image_grid_thw` rows (t, h, w) in patches: what native
        resolution gives (every image its own grid). Qwen3-VL adds its DeepStack sets as channels."""
        output = model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw, return_dict=True)
        return list(output.pooler_output)

    def prompt_images(self, config: Any, pixel_values: torch.Tensor, grid: tuple[int, int] | None) -> dict[str, Any]:
        if grid is None:
            raise ValueError(f"a {self.model_type} model needs its images' merged grid (BuiltModel.visual_grid)")
        grid_thw = self.patch_grid_thw(config, grid, pixel_values.shape[0], pixel_values.device)
        return {"pixel_values": pixel_values.flatten(0, 1), "image_grid_thw": grid_thw}

    def stand_in_input(
        self, config: Any, grid: tuple[int, int] | None, dtype: Any, device: Any
    ) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        vision = config.vision_config
        merge = vision.spatial_merge_size
        rows, columns = grid if grid is not None else (1, 1)
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return torch.zeros((1, rows * columns * merge * merge, patch), dtype=dtype, device=device), None

    def layout_position_ids(
        self,
        model: Any,
        layout: Any,
        grid: tuple[int, int] | None,
        image_token_id: int,
        packed: bool,
        query_tokens: bool = False,
    ) -> torch.Tensor:
        """M-RoPE ids of every document of the layout from `get_rope_index`, each from 0 as alone.

        `layout.position_ids` restart at 0 at every document (and the padding tail); each document's
        images are pooled to the grid of its scale. Packed: (4, rows, width), the 1-D ids first (the
        mask boundaries); padded: (3, rows, width) beside the attention mask. MQT's query tokens
        (`query_tokens`) take text ids: all three axes the 1-D id, as `get_rope_index` gives text.
        """
        flat, ids, scales = layout.position_ids, layout.input_ids, layout.token_scales
        mrope = flat[None].repeat(3, 1, 1)
        if query_tokens:
            return torch.cat([flat[None], mrope]) if packed else mrope
        if layout.image_grids is not None:
            self.per_image_position_ids(model, layout, mrope)
            return torch.cat([flat[None], mrope]) if packed else mrope
        starts = [[] for _ in range(ids.shape[0])]
        for row, column in (flat == 0).nonzero().tolist():  # one read of the layout's document starts
            starts[row].append(column)
        scale_at = scales.tolist()
        for row, row_starts in enumerate(starts):
            for start, end in zip(row_starts, [*row_starts[1:], ids.shape[1]], strict=True):
                document = ids[row, start:end]
                is_image = document == image_token_id
                scale = scale_at[row][start]
                if scale == 0 or not bool(is_image.any()):
                    continue  # text only (or the padding tail): the 1-D ids are M-RoPE's too
                factor = grid_factor(grid, scale)
                images = int(is_image.sum()) // scale
                grid_thw = pooled_grid_thw(self.patch_grid_thw(model.config, grid, images, ids.device), factor)
                positions, _ = model.model.get_rope_index(document[None], is_image[None].int(), image_grid_thw=grid_thw)
                mrope[:, row, start:end] = positions[:, 0]
        return torch.cat([flat[None], mrope]) if packed else mrope

    def per_image_position_ids(self, model: Any, layout: Any, mrope: torch.Tensor) -> None:
        """Fill `mrope` (3, rows, width) with every document's M-RoPE ids, each document from 0, when each image
        has its own pooled grid (`layout.image_grids`, in layout order): a document takes the next grids until
        their tokens make up its image tokens."""
        merge = model.config.vision_config.spatial_merge_size
        flat, ids = layout.position_ids, layout.input_ids
        is_image = ids == self.image_token_id(model.config)
        image_tokens = torch.cumsum(is_image.long(), dim=1)  # one host read below for every document's count
        starts = [[] for _ in range(ids.shape[0])]
        for row, column in (flat == 0).nonzero().tolist():
            starts[row].append(column)
        tokens_so_far = image_tokens.tolist()
        grids = iter(layout.image_grids)
        for row, row_starts in enumerate(starts):
            for start, end in zip(row_starts, [*row_starts[1:], ids.shape[1]], strict=True):
                count = tokens_so_far[row][end - 1] - (tokens_so_far[row][start - 1] if start else 0)
                document_grids = []
                while count > 0:
                    t, h, w = next(grids)
                    document_grids.append([t, h, w])
                    count -= t * (h // merge) * (w // merge)
                if count < 0:
                    raise ValueError(f"row {row}: a document's image tokens do not match its images' pooled grids")
                if not document_grids:
                    continue  # text only (or the padding tail): the 1-D ids are M-RoPE's too
                grid_thw = torch.tensor(document_grids, device=ids.device)
                document = ids[row, start:end]
                positions, _ = model.model.get_rope_index(
                    document[None], is_image[row, start:end][None].int(), image_grid_thw=grid_thw
                )
                mrope[:, row, start:end] = positions[:, 0]


class Qwen2_5_VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL (`model_type == "qwen2_5_vl"`): Qwen2-VL's pipeline as is. Its tower adds window
    attention (and RMSNorm / SwiGLU blocks) inside `model.visual`, which returns the merged tokens in the
    same row-major grid order; the merger, the image token and M-RoPE (`get_rope_index`, images at one
    temporal position) are Qwen2-VL's."""

    model_type = "qwen2_5_vl"
    model_class_path = "transformers:Qwen2_5_VLForConditionalGeneration"
