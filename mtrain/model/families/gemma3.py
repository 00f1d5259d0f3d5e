"""Gemma 3 (`model_type == "gemma3"`): a SigLIP tower, a pooling projector, bidirectional attention within an image.

- Images -> grids: the stock image processor resizes each image to the tower's image_size square
  (no pan-and-scan here); the SigLIP tower emits its (image_size / patch_size)^2 patch grid, no CLS.
- Projector: `Gemma3MultiModalProjector` average-pools that patch grid to sqrt(mm_tokens_per_image)
  tokens per side, RMS-normalises and projects them: one image is a square grid of
  mm_tokens_per_image tokens (`visual_grid`), row-major.
- M3 on that pooled grid: a scale is a square k*k with k dividing the side; M3 average-pools the
  projected grid by side / k per side (`mtrain.model.token_scales.pool_grid`, as for LLaVA), so the
  scales nest (16 -> 4 -> 1 on a 4x4 grid) and every rank computes the same counts.
- Sequence: the tokens fill the positions of `image_token_id` (`<image_soft_token>`) between
  `<start_of_image>` and `<end_of_image>`, k*k of them at scale k*k. Captions and interleaved documents get
  Gemma3Processor's text around each image, `\n\n<start_of_image>` + soft tokens + `<end_of_image>\n\n`
  (`image_markers`), the blank lines tokenized with the text beside them as the processor's prompt is
  (data_pipeline/tokenize.py), unlearned like the image's tokens.
- Attention: causal, except that the tokens of one image attend to each other both ways, as stock
  Gemma 3 does from `token_type_ids` (1 on image tokens). The image runs are read from the pooled
  layout, so the bidirectional block always has the pooled count. Padded rows pass `token_type_ids`
  to the stock mask. Packed rows get masks built here (`packed_masks`): stock Gemma 3 applies its
  image overlay to the sliding-window layers before remapping packed positions, so a packed row's
  sliding layers would read the image blocks at the wrong columns; here attention is
  same-document AND (causal OR same-image), AND the sliding window on sliding layers.
- Position ids: 1-D, from 0 at each document's first token; visual tokens take consecutive positions.
- Objectives: next-token training with M3, with MQT (a query transformer after the projector reads its
  pooled soft tokens, `mtrain/model/mqt_head.py`; the query tokens fill the image's positions and attend to
  each other both ways, as any image's tokens) or without scales; the contrastive objective, with the same
  image attention (`language_model_inputs`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from data_pipeline.chat_template import message_text_template
from mtrain.model.families.base import ModelFamily, tiny_text_sizes, tiny_vision_sizes
from mtrain.model.families.llava import m3_scale_problems

IMAGE_SOFT_TOKEN = "<image_soft_token>"  # the image token: one per visual token in the sequence
# Gemma 3's special tokens, as its tokenizer has them (the tiny preset's tokenizer carries the same).
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    IMAGE_SOFT_TOKEN,
]
IMAGE_MARKER_GAP = "\n\n"  # Gemma3Processor's blank line before <start_of_image> and after <end_of_image>
POOL_PER_SIDE = 2  # the tiny preset's projector pools 2x2 patches into one token

# Gemma 3's chat template shape: BOS, turns `<start_of_turn>{user|model}\n...<end_of_turn>\n`, a system
# message prepended to the first user turn; an image part is written as
# <start_of_image><image_soft_token><end_of_image> (the stock template writes <start_of_image> and its
# processor expands it; here tokenization expands the soft token). The model's parts are marked by
# {% generation %} so `apply_chat_template(..., return_assistant_tokens_mask=True)` gives the training mask.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- if system is not string -%}{%- set system = system | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- set system = system + '\\n\\n' -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    + message_text_template("<start_of_image>" + IMAGE_SOFT_TOKEN + "<end_of_image>")
    + "{%- if message['role'] == 'assistant' -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- generation -%}{{- text + '<end_of_turn>\\n' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>user\\n' + (system if loop.first else '') + text + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def build_tiny_gemma3_tokenizer(vocab_size: int = 512) -> Any:
    """The tiny preset's tokenizer in Gemma 3's shape: its special tokens, `<bos>` written by the template,
    `<end_of_turn>` ending a turn, `<pad>` padding, and the Gemma-shaped chat template."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    from mtrain.model.tokenizer import train_tiny_bpe  # noqa: PLC0415

    return PreTrainedTokenizerFast(
        tokenizer_object=train_tiny_bpe(SPECIAL_TOKENS, vocab_size),
        chat_template=CHAT_TEMPLATE,
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": IMAGE_SOFT_TOKEN,
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )


def tiny_gemma3_config(tiny: Any, vocab_size: int, tokenizer: Any) -> Any:
    """The tiny preset's Gemma3Config: a small Gemma 3 language model (a sliding-window layer, then a
    global one) and a SigLIP tower whose patch grid the projector pools 2x2."""
    from transformers import Gemma3Config  # noqa: PLC0415

    head_dim = tiny.hidden_size // tiny.num_heads
    text = {
        **tiny_text_sizes(tiny, vocab_size),
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        # Short enough that a tiny document crosses it, so the sliding layers' masks are exercised.
        "sliding_window": 32,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(tiny.num_layers)],
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    vision = {
        "model_type": "siglip_vision_model",
        **tiny_vision_sizes(tiny),
    }
    side = tiny.image_size // tiny.patch_size // POOL_PER_SIDE
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=side * side,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_SOFT_TOKEN),
        tie_word_embeddings=False,
    )


def tiny_gemma3_image_processor(image_size: int) -> Any:
    """Gemma 3's own image processor (the PIL one: the default wants torchvision) at the tiny size."""
    from transformers import Gemma3ImageProcessorPil  # noqa: PLC0415

    return Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})


def start_projection(model: Any, seed: int) -> None:
    """Give a fresh model's projection weight a seeded random start, the same on every rank.

    Stock Gemma 3 initialises `mm_input_projection_weight` to zeros (a real checkpoint brings trained
    values), which would make every image of a random tiny model the same zero vector and M3's pooling
    untestable. Under ZeRO-3 the weight is gathered, written on rank 0 and re-partitioned.
    """
    from mtrain.launch.preflight import is_partitioned  # noqa: PLC0415

    weight = model.model.multi_modal_projector.mm_input_projection_weight
    gathered: Any = contextlib.nullcontext()
    if is_partitioned(weight):
        import deepspeed  # noqa: PLC0415

        gathered = deepspeed.zero.GatheredParameters([weight], modifier_rank=0)
    with gathered, torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        start = torch.randn(weight.shape, generator=generator) * model.config.text_config.initializer_range
        weight.copy_(start.to(weight.dtype))


def packed_masks(config: Any, layout: Any, image_token_id: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The attention masks of a packed layout, one per Gemma 3 layer type, (rows, 1, width, width).

    A token attends to the tokens of its own document that precede it, and to every token of its own
    image; sliding layers further keep only keys less than `sliding_window` columns back (stock Gemma 3's
    AND(sliding, OR(causal, image)) within each document). Boolean for SDPA, additive for eager.
    """
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask  # noqa: PLC0415

    text = config.get_text_config()
    width = layout.input_ids.shape[1]
    documents = (layout.position_ids == 0).cumsum(-1)  # every document (and the padding tail) from 0
    blocks = get_block_sequence_ids_for_mask((layout.input_ids == image_token_id).long())
    column = torch.arange(width, device=layout.input_ids.device)
    causal = column[None, :, None] >= column[None, None, :]
    same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    full = (documents[:, :, None] == documents[:, None, :]) & (causal | same_image)
    sliding = full & (column[None, None, :] > column[None, :, None] - text.sliding_window)
    masks = {"full_attention": full[:, None], "sliding_attention": sliding[:, None]}
    if text._attn_implementation == "eager":
        low = torch.finfo(dtype).min
        return {name: torch.zeros((), dtype=dtype).masked_fill(~mask, low) for name, mask in masks.items()}
    return masks


class Gemma3Family(ModelFamily):
    model_type = "gemma3"
    generates = True
    model_class_path = "transformers:Gemma3ForConditionalGeneration"
    position_ids = "1-D, from 0 at each document's first token; visual tokens take consecutive positions"
    flash_attention = False  # transformers' Gemma 3 refuses it: flash attention drops the bidirectional mask
    # Gemma3Processor's `full_image_sequence` around the soft tokens it expands each image to.
    image_markers = (f"{IMAGE_MARKER_GAP}<start_of_image>", f"<end_of_image>{IMAGE_MARKER_GAP}")

    def visual_tokens(self, config: Any) -> int:
        return config.mm_tokens_per_image

    def visual_grid(self, config: Any) -> tuple[int, int] | None:
        side = round(config.mm_tokens_per_image**0.5)
        return (side, side)

    def image_token_id(self, config: Any) -> int:
        return config.image_token_id

    def problems(self, config: Any, tokens: Any, image_size: list[int] | None = None) -> list[str]:
        if image_size:
            side = config.vision_config.image_size
            return [f"model.image_size={image_size} is for Qwen models; a gemma3 tower takes {side}x{side} images"]
        return m3_scale_problems(self.visual_grid(config), tokens.scales) if tokens.mode == "m3" else []

    def language_model_inputs(self, model: Any, layout: Any, image_token_id: int, packed: bool) -> dict[str, Any]:
        """Gemma 3's bidirectional attention within each image of the (pooled) layout."""
        if packed:
            return {"attention_mask": packed_masks(model.config, layout, image_token_id, model.dtype)}
        return {"token_type_ids": (layout.input_ids == image_token_id).long()}
