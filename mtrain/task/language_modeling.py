"""Next-token prediction on image-conditioned text (captions, documents, conversations)."""

from __future__ import annotations

from typing import Any

import torch

from data_pipeline.collate import IMAGE_GRID_THW, IMAGE_SIZES
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.model.families.base import ModelFamily
from mtrain.task.base import Task, learned_per_row
from mtrain.task.next_token import learned_count, learned_logits, learned_positions, next_token_losses
from mtrain.task.token_layout import Layout


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
        """The model's next-token loss, with `lm_head` applied only where a target is learned (next_token.py)."""
        layout, packed = self.layout(batch)
        inputs = {
            "position_ids": self.family.layout_position_ids(
                self.llava, layout, self.visual_grid, self.image_token_id, packed
            )
        }
        if not packed:
            # Packed rows go without a 2D mask: transformers then derives a block-diagonal causal mask
            # from the position ids (they restart per document), so attention never crosses documents.
            inputs["attention_mask"] = batch["attention_mask"]
        inputs.update(self.family.language_model_inputs(self.llava, layout, self.image_token_id, packed))
        embeddings, visual_inputs = self.embed(
            batch["input_ids"], batch.get("pixel_values"), batch.get(IMAGE_SIZES), batch.get(IMAGE_GRID_THW)
        )
        # The model's own forward less its head: no KV cache in training (with one, transformers skips
        # the packed-sequence mask, 5.x).
        language_model = self.family.language_model(self.llava)
        # Qwen3-VL's DeepStack sets (`visual_inputs`) reach the language model at the image positions.
        hidden = language_model(inputs_embeds=embeddings, use_cache=False, **inputs, **visual_inputs).last_hidden_state
        positions = learned_positions(batch["labels"], learned_count(batch))
        losses = next_token_losses(learned_logits(hidden, self.llava.lm_head, positions), positions)
        if self.token_norm is None:
            # The model's own mean over the learned targets (0, not its NaN, when there are none).
            loss = losses.sum() / (positions.targets != IGNORE_INDEX).sum().clamp(min=1)
        else:
            # Summed over tokens and divided by the step's global count, as the model's num_items_in_batch.
            loss = losses.sum() / self.token_norm.counts[0] * self.token_norm.divisor
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
            image_grids=batch.get(IMAGE_GRID_THW),  # images of their own grids (native resolution), unpooled
        )
        return layout, packed

    def learned_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """One group: every learned token of the micro-batch."""
        return learned_per_row(batch["labels"]).sum().reshape(1)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_sizes: list[tuple[int, int]] | None = None,
        image_grid_thw: list[list[int]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Token embeddings with every image's visual tokens spliced in, as the model's own forward does
        (images of their own grids, `image_grid_thw`, or anyres sizes: each image's tokens in order), and
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
        if image_grid_thw is not None:
            features = torch.cat(self.grid_features(pixel_values, image_grid_thw))
        elif image_sizes and self.family.counts_by_image_size:  # anyres: each image its count, by its size
            features = torch.cat(self.family.image_feature_list(self.llava, pixel_values, image_sizes))
        else:
            features = self.image_features(pixel_values, image_sizes).flatten(0, 1)
        return self.family.splice_visual(self.llava, embeddings, input_ids == self.image_token_id, features)
