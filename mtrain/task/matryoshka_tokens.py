"""Matryoshka visual tokens: every scale of a batch trained in one pass through the language model.

One step:

    pixel_values ─► vision tower + projector, once ─► features (images, full, dim)
    for each scale the step uses:  M3 pool / MQT prefix ─► (images, scale, dim)
                                   shrink every <image> run of the text to `scale` tokens
                                   splice the features into the text embeddings
    concatenate all (sample, scale) rows ─► language model + lm_head, once ─► per-row token losses
    loss = weighted mean over scales of each scale's token-mean loss

The language model runs once per step, so ZeRO-3 gathers its parameters once per step, not once
per scale. Rows of every scale share the forward; scale-specific LoRA adapters see only their
rows through `ScaleRouting`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtrain.config.schema import TokenScalesConfig
from mtrain.model.scale_lora import ScaleRouting
from mtrain.model.token_scales import ScaleSampler, pool_grid, shrink_image_runs

IGNORE_INDEX = -100


def pad_right(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    """Concatenate along rows, right-padding dimension 1 (F.pad lists dimensions from the last)."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]), value=value) for t in tensors])


class MatryoshkaTokenTask(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        tokens: TokenScalesConfig,
        image_token_id: int,
        image_tokens: int,
        pad_token_id: int,
        seed: int,
        rank: int,
        routing: ScaleRouting | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokens = tokens
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens  # tokens per <image> in the loader's output
        self.pad_token_id = pad_token_id
        self.rank = rank
        self.routing = routing
        self.sampler = ScaleSampler(tokens.scales, tokens.policy, seed)
        weights = tokens.weights or [1.0] * len(tokens.scales)
        self.scale_weights = dict(zip(tokens.scales, weights, strict=True))
        self.step = 0

    # ── which scales ──────────────────────────────────────────────────────────────────────────
    @property
    def mqt_stage_one(self) -> bool:
        return self.tokens.mode == "mqt" and self.tokens.mqt_stage == 1

    @property
    def reported_scales(self) -> list[int]:
        """Scales with a loss of their own: MQT stage 1 trains only at all M queries."""
        return [self.tokens.mqt_queries] if self.mqt_stage_one else self.tokens.scales

    def begin_step(self, step: int) -> None:
        self.step = step

    def plan(self, rows: int) -> list[int]:
        """The scale of each (row, scale) variant this step, rows repeated per scale under `all`."""
        if self.mqt_stage_one:
            return [self.tokens.mqt_queries] * rows
        if self.tokens.policy == "all":
            return [scale for scale in self.tokens.scales for _ in range(rows)]
        if self.tokens.policy == "sample_per_step":
            return [self.sampler.step_scale(self.step)] * rows
        return self.sampler.row_scales(self.step, self.rank, rows)

    # ── the pieces ────────────────────────────────────────────────────────────────────────────
    @property
    def llava(self) -> nn.Module:
        """The LlavaForConditionalGeneration inside (PEFT-wrapped or not)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens of every image at full size: (images, full, dim). Runs once per step."""
        output = self.llava.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.stack(list(output.pooler_output))

    def at_scale(self, features: torch.Tensor, scale: int) -> torch.Tensor:
        if self.tokens.mode == "mqt":
            return features[:, :scale]  # queries are independent: the first m of M equal an m-query pass
        return pool_grid(features, scale)

    def variant_rows(
        self, batch: dict[str, Any], features: torch.Tensor, row_ids: torch.Tensor, scale: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, labels, attention mask, visual tokens) of rows `row_ids` with every image at `scale`."""
        input_ids, labels, attention_mask = shrink_image_runs(
            batch["input_ids"][row_ids],
            batch["labels"][row_ids],
            batch["attention_mask"][row_ids],
            self.image_token_id,
            self.image_tokens,
            scale,
            self.pad_token_id,
        )
        images = self.images_of_rows(batch["input_ids"], row_ids)
        visual = self.at_scale(features[images], scale).reshape(-1, features.shape[-1])
        return input_ids, labels, attention_mask, visual

    def images_of_rows(self, input_ids: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        """Indices into the batch's images of the images that rows `row_ids` hold, in order."""
        per_row = (input_ids == self.image_token_id).sum(dim=1) // self.image_tokens
        first = torch.cumsum(per_row, dim=0) - per_row
        return torch.cat([torch.arange(int(first[r]), int(first[r] + per_row[r])) for r in row_ids.tolist()])

    # ── the step ──────────────────────────────────────────────────────────────────────────────
    def forward(self, batch: dict[str, Any], scales: list[int] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss over the step's scales (or the given `scales`, each applied to every row).

        Every module runs exactly once, whatever scales this rank's rows drew: ZeRO-3 needs the
        same module sequence on every rank.
        """
        rows = batch["input_ids"].shape[0]
        plan = [s for s in scales for _ in range(rows)] if scales is not None else self.plan(rows)
        features = self.image_features(batch["pixel_values"])
        plan_tensor = torch.tensor(plan)
        row_index = torch.arange(len(plan)) % rows
        ids, labels, masks, visual, variant_scales = [], [], [], [], []
        for scale in sorted(set(plan)):  # sorted: rows of one scale together, in a fixed order
            variants = (plan_tensor == scale).nonzero().flatten()
            for store, value in zip(
                (ids, labels, masks, visual),
                self.variant_rows(batch, features, row_index[variants], scale),
                strict=True,
            ):
                store.append(value)
            variant_scales.append(torch.full((len(variants),), scale))
        input_ids, attention_mask = pad_right(ids, self.pad_token_id), pad_right(masks, 0)
        embeddings = self.llava.get_input_embeddings()(input_ids)
        image_positions = (input_ids == self.image_token_id).unsqueeze(-1)
        embeddings = embeddings.masked_scatter(image_positions, torch.cat(visual).to(embeddings.dtype))
        row_scales = torch.cat(variant_scales)
        token_losses, label_tokens = self.language_model_losses(
            embeddings, pad_right(labels, IGNORE_INDEX), attention_mask, row_scales
        )
        return self.combine(token_losses, label_tokens, row_scales, attention_mask)

    def language_model_losses(
        self, embeddings: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor, row_scales: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row sums of next-token losses and per-row label-token counts, from one forward."""
        if self.routing is not None:
            self.routing.set_rows(row_scales)
        try:
            hidden = self.llava.model(inputs_embeds=embeddings, attention_mask=attention_mask).last_hidden_state
            logits = self.llava.lm_head(hidden)
        finally:
            if self.routing is not None:
                self.routing.clear()
        targets = labels[:, 1:]
        losses = F.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        return losses.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)

    def combine(
        self,
        row_loss_sums: torch.Tensor,
        row_tokens: torch.Tensor,
        row_scales: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        scales = self.reported_scales
        loss_sums = torch.stack([row_loss_sums[row_scales == s].sum() for s in scales])
        token_counts = torch.stack([row_tokens[row_scales == s].sum() for s in scales]).to(loss_sums.dtype)
        present = token_counts > 0
        if self.tokens.policy == "all" and not self.mqt_stage_one:
            weights = torch.tensor([self.scale_weights[s] for s in scales], dtype=loss_sums.dtype) * present
            per_scale = loss_sums / token_counts.clamp(min=1)
            loss = (weights * per_scale).sum() / weights.sum()
        else:
            loss = loss_sums.sum() / token_counts.sum().clamp(min=1)
        step_scale = float(row_scales[0]) if self.tokens.policy == "sample_per_step" else 0.0
        metrics = {
            "tokens": attention_mask.sum().detach(),
            # Summed over ranks by the trainer: identical draws leave a zero spread (see summarize).
            "step_scale": torch.tensor(step_scale),
            "step_scale_sq": torch.tensor(step_scale**2),
            "draws": torch.tensor(1.0),
            "label_tokens": token_counts.sum().detach(),
            "scale_loss_sum": loss_sums.detach(),
            "scale_label_tokens": token_counts.detach(),
        }
        return loss, metrics

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loggable per-scale losses from metrics summed over micro-batches and ranks."""
        out = {}
        if self.tokens.policy == "sample_per_step":
            draws = float(totals["draws"])
            mean = float(totals["step_scale"]) / draws
            out["scale_drawn"] = mean
            out["scale_drawn_rank_spread"] = max(0.0, float(totals["step_scale_sq"]) / draws - mean**2)
        for i, scale in enumerate(self.reported_scales):
            count = float(totals["scale_label_tokens"][i])
            if count > 0:
                out[f"loss/scale_{scale}"] = float(totals["scale_loss_sum"][i]) / count
        return out
