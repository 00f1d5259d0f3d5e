"""Next-token prediction on image-conditioned text (captions, documents, conversations)."""

from __future__ import annotations

from typing import Any

import torch

from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.task.base import Task

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids")


class LanguageModelingTask(Task):
    """Wraps the MLLM; `forward(batch)` returns the mean token loss and counted metrics."""

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
        if "position_ids" in inputs:
            # Packed rows: with no 2D mask, transformers derives a block-diagonal causal mask from
            # the position ids (they restart per document), so attention never crosses documents.
            inputs.pop("attention_mask", None)
        if "pixel_values" not in inputs or inputs["pixel_values"].numel() == 0:  # a shape: known on the host
            inputs = self.text_only_inputs(inputs)
        # No KV cache in training; with one, transformers skips the packed-sequence mask (5.x).
        output = self.model(**inputs, use_cache=False)
        metrics = {
            "tokens": batch["attention_mask"].sum().detach(),
            "label_tokens": (batch["labels"] != IGNORE_INDEX).sum().detach(),
        }
        return output.loss, metrics

    def text_only_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A batch without images: the embeddings, with the zero-weighted vision pass added, instead of ids and pixels.

        The modules run in the order the model's own forward runs them for an image batch
        (embeddings, vision tower, projector, language model), so ZeRO-3 ranks stay in step.
        """
        inputs = dict(inputs)
        inputs.pop("pixel_values", None)
        embeddings = self.llava.get_input_embeddings()(inputs.pop("input_ids"))
        inputs["inputs_embeds"] = embeddings + self.vision_stand_in(embeddings.device).to(embeddings.dtype)
        return inputs
