"""Next-token prediction on image-conditioned text (captions, documents, conversations)."""

from __future__ import annotations

from typing import Any

import torch

from data_pipeline.collate import IMAGE_SIZES
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.model.families.base import ModelFamily
from mtrain.task.base import Task, learned_per_row
from mtrain.task.token_layout import Layout

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids")


class LanguageModelingTask(Task):
    """Wraps the MLLM; `forward(batch)` returns the mean token loss and counted metrics."""

    def __init__(
        self,
        model: torch.nn.Module,
        image_token_id: int,
        family: ModelFamily | None = None,
        visual_grid: tuple[int, int] | None = None,
        visual_tokens: int = 0,
    ) -> None:
        super().__init__(model)
        self.image_token_id = image_token_id
        # How this model's images become tokens and its tokens get positions (None: the registry's).
        self.given_family = family
        self.visual_grid = visual_grid  # (rows, columns) of every image's tokens; None: a square grid
        self.visual_tokens = visual_tokens  # tokens per <image> in the batch

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
        layout, packed = self.layout(batch)
        inputs["position_ids"] = self.family.layout_position_ids(
            self.llava, layout, self.visual_grid, self.image_token_id, packed
        )
        if packed:
            # Packed rows: with no 2D mask, transformers derives a block-diagonal causal mask from
            # the position ids (they restart per document), so attention never crosses documents.
            inputs.pop("attention_mask", None)
        inputs.update(self.family.language_model_inputs(self.llava, layout, self.image_token_id, packed))
        pixel_values, image_sizes = inputs.pop("pixel_values", None), batch.get(IMAGE_SIZES)
        inputs["inputs_embeds"], visual_inputs = self.embed(inputs.pop("input_ids"), pixel_values, image_sizes)
        if self.token_norm is not None:
            # The model's own loss, summed over tokens and divided by the step's global count.
            inputs["num_items_in_batch"] = self.token_norm.counts[0]
        # No KV cache in training; with one, transformers skips the packed-sequence mask (5.x).
        if visual_inputs:
            loss = self.language_model_loss(inputs, visual_inputs)
        else:
            loss = self.model(**inputs, use_cache=False).loss
        loss = loss if self.token_norm is None else loss * self.token_norm.divisor
        metrics = {
            "tokens": batch["attention_mask"].sum().detach(),
            "label_tokens": (batch["labels"] != IGNORE_INDEX).sum().detach(),
        }
        return loss, metrics

    def layout(self, batch: dict[str, Any]) -> tuple[Layout, bool]:
        """The batch as a token layout (every image at full size) and whether its rows are packed: what the
        family's position ids (1-D per document, or Qwen's M-RoPE ids) and extra inputs are made from."""
        input_ids, real = batch["input_ids"], batch["attention_mask"]
        packed = "position_ids" in batch
        flat = batch["position_ids"] if packed else torch.arange(input_ids.shape[1], device=input_ids.device)
        layout = Layout(
            input_ids=input_ids,
            labels=batch["labels"],
            position_ids=flat.expand_as(input_ids),
            attention_mask=None if packed else real,
            token_scales=real * self.visual_tokens,  # every image at its full count
            variants=[],
        )
        return layout, packed

    def learned_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """One group: every learned token of the micro-batch."""
        return learned_per_row(batch["labels"]).sum().reshape(1)

    def language_model_loss(self, inputs: dict[str, Any], visual_inputs: dict[str, Any]) -> torch.Tensor:
        """The model's own loss, through the module its forward ends in, for images whose family hands the
        language model more than their tokens (Qwen3-VL's DeepStack sets at the image positions), which the
        stock forward takes from its own vision pass only. What the stock forward computes from here on:
        language model, `lm_head`, its `loss_function`."""
        model = self.llava
        labels, num_items = inputs.pop("labels"), inputs.pop("num_items_in_batch", None)
        hidden = self.family.language_model(model)(**inputs, **visual_inputs, use_cache=False).last_hidden_state
        vocab_size = model.config.get_text_config().vocab_size
        return model.loss_function(
            logits=model.lm_head(hidden), labels=labels, vocab_size=vocab_size, num_items_in_batch=num_items
        )

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Token embeddings with every image's visual tokens spliced in, as the model's own forward does, and
        what else of the images the language model takes (the family's `splice_visual`: Qwen3-VL's DeepStack
        sets at the image positions; empty for the others).

        Done here, before the model is called, so the modules run in one order whatever the batch
        holds (embeddings, vision tower, projector, language model): under ZeRO-3 every rank must
        gather the same modules in the same order. A batch without images runs the vision path on a
        stand-in image whose output enters times zero.
        """
        embeddings = self.llava.get_input_embeddings()(input_ids)
        if pixel_values is None or pixel_values.numel() == 0:  # a shape: known on the host
            return embeddings + self.vision_stand_in(embeddings.device).to(embeddings.dtype), {}
        features = self.image_features(pixel_values, image_sizes).flatten(0, 1)
        return self.family.splice_visual(self.llava, embeddings, input_ids == self.image_token_id, features)
