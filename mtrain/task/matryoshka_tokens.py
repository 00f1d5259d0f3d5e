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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtrain.config.schema import TokenScalesConfig
from mtrain.model.scale_lora import ScaleRouting
from mtrain.model.token_scales import image_keep_mask, pool_grid, shrink_image_runs
from mtrain.task.draws import ScaleSampler, draw_slots, rank_spread

IGNORE_INDEX = -100


@dataclass
class Variant:
    """One sample at one scale: its tokens (no padding) and the visual tokens its images take."""

    row: int
    scale: int
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    visual: torch.Tensor  # (images * scale, dim)


@dataclass
class Layout:
    """Variants arranged into the language model's batch."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None when packed: transformers derives the mask from position ids
    token_scales: torch.Tensor  # scale of each token's variant; 0 on padding
    visual: torch.Tensor  # every variant's visual tokens, in the order their image tokens appear


def segment_positions(input_ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at every document start."""
    positions = torch.arange(len(input_ids))
    segment = torch.zeros(len(input_ids), dtype=torch.long)
    segment[starts[1:]] = 1
    segment = torch.cumsum(segment, dim=0)
    return positions - starts[segment]


def lay_out(variants: list[Variant], layout: str, pad_token_id: int) -> Layout:
    """`packed`: a sample's variants of every scale share one row, attention block-diagonal, so
    no position is padding but a row's tail. `padded`: one row per variant, right-padded."""
    if layout == "packed":
        by_row: dict[int, list[Variant]] = {}
        for variant in variants:
            by_row.setdefault(variant.row, []).append(variant)
        rows = [by_row[r] for r in sorted(by_row)]
    else:
        rows = [[variant] for variant in variants]
    width = max(sum(len(v.input_ids) for v in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)
    token_scales = torch.zeros(shape, dtype=torch.long)
    visual = []
    for r, row in enumerate(rows):
        start = 0
        for variant in row:
            end = start + len(variant.input_ids)
            input_ids[r, start:end] = variant.input_ids
            labels[r, start:end] = variant.labels
            position_ids[r, start:end] = variant.position_ids
            token_scales[r, start:end] = variant.scale
            visual.append(variant.visual)
            start = end
        position_ids[r, start:] = torch.arange(width - start)  # the padding tail: a segment of its own
    attention_mask = None if layout == "packed" else (token_scales > 0).long()
    return Layout(input_ids, labels, position_ids, attention_mask, token_scales, torch.cat(visual))


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
        self.micro_batch = 0

    # ── which scales ──────────────────────────────────────────────────────────────────────────
    @property
    def mqt_stage_one(self) -> bool:
        return self.tokens.mode == "mqt" and self.tokens.mqt_stage == 1

    @property
    def reported_scales(self) -> list[int]:
        """Scales with a loss of their own: MQT stage 1 trains only at all M queries."""
        return [self.tokens.mqt_queries] if self.mqt_stage_one else self.tokens.scales

    def begin_step(self, step: int, micro_batch: int = 0) -> None:
        """Key the next forward's draws: each accumulated micro-batch draws anew, as the references do per forward."""
        self.step = step
        self.micro_batch = micro_batch

    def sampler_state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_sampler_state_dict(self, state: dict[str, Any]) -> None:
        # Draws are a function of (seed, step): restoring the step restores them. A changed seed,
        # scale list or policy would silently change the draws, so refuse it.
        if state != self.sampler.state_dict():
            raise ValueError(
                f"the checkpoint's scale sampler {state} differs from this run's {self.sampler.state_dict()}"
            )

    def plan(self, rows: int) -> list[int]:
        """The scale of each (row, scale) variant this step, rows repeated per scale under `all`."""
        if self.mqt_stage_one:
            return [self.tokens.mqt_queries] * rows
        if self.tokens.policy == "all":
            return [scale for scale in self.tokens.scales for _ in range(rows)]
        if self.tokens.policy == "sample_per_step":
            return [self.sampler.step_scale(self.step, self.micro_batch)] * rows
        return self.sampler.row_scales(self.step, rows, self.micro_batch)

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

    def scale_group(
        self, batch: dict[str, Any], features: torch.Tensor, row_ids: torch.Tensor, scale: int
    ) -> list[Variant]:
        """Rows `row_ids` with every image run shrunk to `scale` tokens, each with its visual tokens."""
        input_ids, labels, attention_mask = shrink_image_runs(
            batch["input_ids"][row_ids],
            batch["labels"][row_ids],
            self.real_tokens(batch)[row_ids],
            self.image_token_id,
            self.image_tokens,
            scale,
            self.pad_token_id,
        )
        starts = self.document_start_flags(batch, row_ids, scale)
        images_per_row = (input_ids == self.image_token_id).sum(dim=1) // scale
        visual = self.at_scale(features[self.images_of_rows(batch["input_ids"], row_ids)], scale)
        visual_per_row = torch.split(visual.reshape(-1, visual.shape[-1]), (images_per_row * scale).tolist())
        variants = []
        for i, row in enumerate(row_ids.tolist()):
            n = int(attention_mask[i].sum())
            ids = input_ids[i, :n]
            positions = segment_positions(ids, starts[i, :n].nonzero().flatten())
            variants.append(Variant(row, scale, ids, labels[i, :n], positions, visual_per_row[i]))
        return variants

    def real_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """1 on real tokens, 0 on padding (packed batches carry no attention mask: pad ids mark padding)."""
        if "attention_mask" in batch:
            return batch["attention_mask"]
        return (batch["input_ids"] != self.pad_token_id).long()

    def document_start_flags(self, batch: dict[str, Any], row_ids: torch.Tensor, scale: int) -> torch.Tensor:
        """(rows, kept tokens) flags of document starts: a packed input row holds several documents,
        each starting where its position id is 0; otherwise the row is one document."""
        real = self.real_tokens(batch)[row_ids]
        if "position_ids" in batch:
            flags = batch["position_ids"][row_ids] == 0
        else:
            flags = torch.zeros_like(real, dtype=torch.bool)
            flags[:, 0] = True
        keep = image_keep_mask(batch["input_ids"][row_ids], real, self.image_token_id, self.image_tokens, scale)
        kept = [flags[i][keep[i]] for i in range(len(row_ids))]
        width = max(len(k) for k in kept)
        return torch.stack([F.pad(k, (0, width - len(k))) for k in kept])

    def images_of_rows(self, input_ids: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        """Indices into the batch's images of the images that rows `row_ids` hold, in order."""
        per_row = (input_ids == self.image_token_id).sum(dim=1) // self.image_tokens
        first = torch.cumsum(per_row, dim=0) - per_row
        return torch.cat([torch.arange(int(first[r]), int(first[r] + per_row[r])) for r in row_ids.tolist()])

    # ── the step ──────────────────────────────────────────────────────────────────────────────
    def forward(self, batch: dict[str, Any], scales: list[int] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss over the step's scales (or the given `scales`, each applied to every row)."""
        rows = batch["input_ids"].shape[0]
        plan = [s for s in scales for _ in range(rows)] if scales is not None else self.plan(rows)
        logits, layout = self.run(batch, plan)
        token_losses = F.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), layout.labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
        )
        return self.combine(token_losses, layout)

    def run(self, batch: dict[str, Any], plan: list[int]) -> tuple[torch.Tensor, Layout]:
        """Logits of every (sample, scale) variant in `plan`, from one vision pass and one LM pass.

        Every module runs exactly once, whatever scales this rank's rows drew: ZeRO-3 needs the
        same module sequence on every rank.
        """
        rows = batch["input_ids"].shape[0]
        features = self.image_features(batch["pixel_values"])
        plan_tensor = torch.tensor(plan)
        row_index = torch.arange(len(plan)) % rows
        variants: list[Variant] = []
        for scale in sorted(set(plan)):  # a fixed order on every rank
            variants += self.scale_group(batch, features, row_index[(plan_tensor == scale).nonzero().flatten()], scale)
        layout = lay_out(variants, self.tokens.layout, self.pad_token_id)
        embeddings = self.llava.get_input_embeddings()(layout.input_ids)
        image_positions = (layout.input_ids == self.image_token_id).unsqueeze(-1)
        embeddings = embeddings.masked_scatter(image_positions, layout.visual.to(embeddings.dtype))
        if self.routing is not None:
            self.routing.set_rows(layout.token_scales)
        try:
            # use_cache=False: with a cache, transformers ignores packed position ids and attends across variants.
            hidden = self.llava.model(
                inputs_embeds=embeddings,
                attention_mask=layout.attention_mask,
                position_ids=layout.position_ids,
                use_cache=False,
            ).last_hidden_state
            return self.llava.lm_head(hidden), layout
        finally:
            if self.routing is not None:
                self.routing.clear()

    @torch.no_grad()
    def evaluate_scale(self, batch: dict[str, Any], scale: int) -> dict[str, float]:
        """Summed loss, token accuracy and answer accuracy (every learned token right) at one scale."""
        rows = batch["input_ids"].shape[0]
        logits, layout = self.run(batch, [scale] * rows)  # one variant per row at a single scale
        targets = layout.labels[:, 1:]
        learned = targets != IGNORE_INDEX
        losses = F.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        right = (logits[:, :-1].argmax(-1) == targets) & learned
        return {
            "loss_sum": float(losses.sum()),
            "tokens": float(learned.sum()),
            "correct_tokens": float(right.sum()),
            "answers_correct": float((right.sum(1) == learned.sum(1)).sum()),
            "answers": float(rows),
        }

    def combine(self, token_losses: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, dict[str, Any]]:
        learned = layout.labels[:, 1:] != IGNORE_INDEX
        target_scales = torch.where(learned, layout.token_scales[:, 1:], 0)
        scales = self.reported_scales
        loss_sums = torch.stack([token_losses[target_scales == s].sum() for s in scales])
        token_counts = torch.stack([(target_scales == s).sum() for s in scales]).to(loss_sums.dtype)
        present = token_counts > 0
        if self.tokens.policy == "all" and not self.mqt_stage_one:
            weights = torch.tensor([self.scale_weights[s] for s in scales], dtype=loss_sums.dtype) * present
            per_scale = loss_sums / token_counts.clamp(min=1)
            loss = (weights * per_scale).sum() / weights.sum()
        else:
            loss = loss_sums.sum() / token_counts.sum().clamp(min=1)
        per_step = self.tokens.policy == "sample_per_step" and not self.mqt_stage_one
        step_scale = float(self.sampler.step_scale(self.step, self.micro_batch)) if per_step else 0.0
        metrics = {
            "tokens": (layout.token_scales > 0).sum(),
            "label_tokens": token_counts.sum().detach(),
            "scale_loss_sum": loss_sums.detach(),
            "scale_label_tokens": token_counts.detach(),
            # Summed over micro-batches and ranks by the trainer: identical draws leave a zero spread.
            "step_scale": torch.tensor(step_scale),
            "draws": torch.tensor(1.0),
            **draw_slots("step_scale", step_scale, self.micro_batch),
        }
        return loss, metrics

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loggable per-scale losses from metrics summed over micro-batches and ranks."""
        out = {}
        if self.tokens.policy == "sample_per_step":
            draws = float(totals["draws"])
            mean = float(totals["step_scale"]) / draws
            out["scale_drawn"] = mean
            out["scale_drawn_rank_spread"] = rank_spread(totals, "step_scale")
        for i, scale in enumerate(self.reported_scales):
            count = float(totals["scale_label_tokens"][i])
            if count > 0:
                out[f"loss/scale_{scale}"] = float(totals["scale_loss_sum"][i]) / count
        return out
