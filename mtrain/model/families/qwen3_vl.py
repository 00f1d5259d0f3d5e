"""Qwen3-VL (`model_type == "qwen3_vl"`): Qwen2-VL's pipeline (`qwen2_vl.py`) plus DeepStack and interleaved M-RoPE.

What differs from Qwen2-VL, read from transformers' `modeling_qwen3_vl.py`:
- DeepStack: besides the merged tokens of its last block, the tower merges the hidden states of
  the blocks `vision_config.deepstack_visual_indexes` (one `deepstack_merger_list` merger each) into
  as many extra token sets of the same grid and width. The language model adds set i to its hidden
  states at the visual positions after decoder layer i (`Qwen3VLTextModel._deepstack_process`).
- Features here: `image_features` returns each image's merged tokens with its DeepStack sets
  concatenated on the channel axis, (images, tokens, dim * (1 + sets)). Every per-token step of the
  task then treats all of them alike: M3's average pooling per channel pools every set with the same
  windows as the main tokens, and the layout places each variant's tokens in layout order. The family's
  `splice_visual` splits them again: the main tokens into the embeddings at the image positions of the
  (pooled, maybe packed) layout, the sets with those same positions as `visual_pos_masks` and
  `deepstack_visual_embeds`, the stock language model's own arguments. So every decoder layer that
  gets DeepStack tokens gets the pooled tokens of each variant at exactly its image positions.
- The language-model call: `Qwen3VLModel.forward` passes its own `visual_pos_masks` /
  `deepstack_visual_embeds` to the language model, so the task calls `model.model.language_model`
  (the forward the stock one ends in; `language_model`) with the spliced embeddings.
- Position ids: Qwen3-VL's `get_rope_index` gives images the ids Qwen2-VL's does (one temporal id,
  height and width ids of the grid from the image's start, the text after it continuing from the grid's
  larger side); it differs only for videos (timestamps split a video's frames). So the ids are
  Qwen2-VL's rule through the model's own `get_rope_index` on each document's pooled grid, per document
  before packing. What is new is inside the rotary embedding: the (temporal, height, width) frequencies
  are interleaved (`mrope_section` with `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`), not
  contiguous blocks; the ids are the same.
- Parts: the DeepStack mergers (`visual.deepstack_merger_list`) count as the vision tower, the
  last merger (`visual.merger`) as the projector, for freezing and LoRA's `modules_to_save` (as
  LLaMA-Factory registers qwen3_vl); they train with `model.freeze.vision_tower=false`.
- Chat template: ChatML like Qwen2-VL's, without a default system prompt (Qwen3-VL's own template
  writes a system turn only when the conversation has one).
- Objectives: every one, each through `splice_visual` and `language_model`, so the DeepStack sets reach
  the language model at the image positions of each task's rows: M3 (above); the plain language-modeling
  task (`mode=none`: the stock forward takes no DeepStack features from outside, so the task calls the
  module it ends in, then `lm_head` and the model's own loss function); the contrastive task (its hidden
  states from the same call).
- MQT (`mode=mqt`, `mtrain/model/mqt_head.py`): the query transformer reads the merged tokens and, as
  its own image, each DeepStack set (`QueryTransformerProjector.read_levels`), with the same weights;
  query i's DeepStack set j is then what query i reads from the tower block j feeds. Why: DeepStack
  adds, at each visual position, earlier-block features of the same image content; M3 keeps that by
  pooling every set with the merged tokens' windows, and under MQT the positions are queries, so each
  set is read by the same queries (no new parameters, and the first m outputs of every set are still
  those of an m-query pass, so scale m stays a prefix of scale M). Dropping the sets instead would feed
  a language model trained with DeepStack something it never saw; one head per set would add
  parameters that the stock checkpoint has no start for. The query tokens take text M-RoPE ids, as on
  Qwen2-VL.
"""

from __future__ import annotations

from typing import Any

import torch

from data_pipeline.chat_template import message_text_template
from mtrain.model.families.base import tiny_text_sizes
from mtrain.model.families.qwen2_vl import (
    IMAGE_PAD,
    Qwen2VLFamily,
    build_tiny_qwen_tokenizer,
    tiny_qwen_tower_sizes,
    token_ids,
)

# Qwen3-VL's chat template shape: ChatML, a system turn only when given, an image part as
# <|vision_start|><|image_pad|><|vision_end|>; assistant parts marked by {% generation %} so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` gives the mask training uses.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    + message_text_template("<|vision_start|>" + IMAGE_PAD + "<|vision_end|>")
    + "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- text + '<|im_end|>\\n' -}}{%- endgeneration -%}"
    "{%- else -%}{{- text + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_tiny_qwen3_tokenizer(vocab_size: int = 512) -> Any:
    """The tiny preset's tokenizer: Qwen2-VL's tokens with Qwen3-VL's chat template."""
    return build_tiny_qwen_tokenizer(vocab_size, chat_template=CHAT_TEMPLATE)


def tiny_qwen3_vl_config(tiny: Any, vocab_size: int, tokenizer: Any) -> Any:
    """The tiny preset's Qwen3VLConfig: a small Qwen3 language model with interleaved M-RoPE and a small
    Qwen3-VL tower (patch `tiny.patch_size`, 2x2 merger) whose every block feeds DeepStack, one set per
    language-model layer (tiny.vision_layers of them)."""
    from transformers import Qwen3VLConfig  # noqa: PLC0415

    head_dim = tiny.hidden_size // tiny.num_heads
    # Interleaved M-RoPE: of head_dim / 2 frequencies, height takes every third from the second, width
    # every third from the third, up to 3 * section each; temporal the rest (Qwen3-VL: 24, 20, 20 of 64).
    spatial = head_dim // 2 // 4
    text = {
        **tiny_text_sizes(tiny, vocab_size),
        "head_dim": head_dim,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * spatial, spatial, spatial],
            "mrope_interleaved": True,
        },
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,  # generation stops at <|im_end|>
        "bos_token_id": None,
    }
    patches_per_side = tiny.image_size // tiny.patch_size
    vision = {
        **tiny_qwen_tower_sizes(tiny),
        # The learned position grid the tower resamples to each image's patch grid: the tiny image's own.
        "num_position_embeddings": patches_per_side * patches_per_side,
        "deepstack_visual_indexes": list(range(min(tiny.vision_layers, tiny.num_layers))),
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids(tokenizer))


class Qwen3VLFamily(Qwen2VLFamily):
    """Qwen3-VL: Qwen2-VL's grids, M3 factors, M-RoPE ids and image processor, with DeepStack's features
    carried beside the merged tokens (see the module docstring)."""

    model_type = "qwen3_vl"
    generates = True  # its DeepStack sets go to the stock generate as pre-encoded image outputs (mtrain/infer.py)
    model_class_path = "transformers:Qwen3VLForConditionalGeneration"
    position_ids = (
        "3-D M-RoPE (interleaved frequencies) from the model's get_rope_index, given each image's pooled grid "
        "(t, h / f, w / f)"
    )

    def grid_features(self, model: Any, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Each image's (tokens, dim * (1 + DeepStack sets)): the merged tokens, then each DeepStack set's."""
        output = model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw, return_dict=True)
        levels = [output.pooler_output, *output.deepstack_features]  # each a tuple of (tokens, dim), one per image
        return [torch.cat(image, dim=-1) for image in zip(*levels, strict=True)]

    def splice_visual(
        self, model: Any, embeddings: torch.Tensor, image_positions: torch.Tensor, visual: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The merged tokens into the embeddings; each DeepStack set at the same positions, for the decoder
        layer of its index (the stock `visual_pos_masks` and `deepstack_visual_embeds`)."""
        levels = visual.split(embeddings.shape[-1], dim=-1)
        main, deepstack = levels[0], list(levels[1:])
        spliced = embeddings.masked_scatter(image_positions.unsqueeze(-1), main.to(embeddings.dtype))
        return spliced, {"visual_pos_masks": image_positions, "deepstack_visual_embeds": deepstack}

    def language_model(self, model: Any) -> Any:
        # The stock Qwen3VLModel.forward sets the DeepStack arguments itself; its language model takes them.
        return model.model.language_model
