"""Matryoshka visual tokens: every scale of a batch trained in one pass through the language model.

One step:

    pixel_values ─► vision tower + projector, once ─► features (images, full, dim)
    for each scale the step uses:  M3 pool / MQT prefix ─► (images, scale, dim)
                                   shrink every <image> run of the text to `scale` tokens
                                   splice the features into the text embeddings
    concatenate all (sample, scale) rows ─► language model, once ─► lm_head at the learned positions
                                            only (mtrain/task/next_token.py) ─► token losses
    loss = weighted mean over scales of each scale's token-mean loss (the means over the step's
           global learned tokens per scale, under `task.token_normalisation: global`)

The language model runs once per step, so ZeRO-3 gathers its parameters once per step, not once
per scale. Rows of every scale share the forward; scale-specific LoRA adapters see only their
rows through `ScaleRouting`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from data_pipeline.collate import IMAGE_GRID_THW, IMAGE_SIZES, ROW_TOKENS
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.config.schema import TokenScalesConfig
from mtrain.model.families.base import ModelFamily
from mtrain.model.mqt_head import mqt_head
from mtrain.model.scale_lora import ScaleRouting
from mtrain.model.token_scales import pool_grid, pool_merged, reference_factor
from mtrain.task.base import Task, learned_per_row
from mtrain.task.draws import ScaleSampler, draw_slots, rank_spread
from mtrain.task.next_token import (
    LearnedPositions,
    learned_count,
    learned_logits,
    learned_positions,
    next_token_losses,
)
from mtrain.task.token_layout import ImageGrids, Layout, lay_out, place_variants, row_counts, visual_in_layout


class MatryoshkaTokenTask(Task):
    def __init__(
        self,
        model: nn.Module,
        tokens: TokenScalesConfig,
        image_token_id: int,
        visual_tokens: int,
        pad_token_id: int,
        seed: int,
        rank: int,
        routing: ScaleRouting | None = None,
        family: ModelFamily | None = None,
        visual_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(model)
        # How this model's images become tokens and its tokens get positions (None: the registry's).
        self.given_family = family
        self.visual_grid = visual_grid  # (rows, columns) of every image's tokens; None: a square grid
        self.tokens = tokens
        self.image_token_id = image_token_id
        self.visual_tokens = visual_tokens  # tokens per <image> in the loader's output: the full grid
        self.pad_token_id = pad_token_id
        self.rank = rank
        self.routing = routing
        self.sampler = ScaleSampler(tokens.scales, tokens.policy, seed)
        weights = tokens.weights or [1.0] * len(tokens.scales)
        self.scale_weights = dict(zip(tokens.scales, weights, strict=True))
        self.step = 0
        self.micro_batch = 0
        self.step_scale = 0  # the one scale of a `sample_per_step` micro-batch, drawn in begin_step
        self.begin_step(0, 0)

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
        if self.tokens.policy == "sample_per_step":
            self.step_scale = self.sampler.step_scale(step, micro_batch)  # on the host, before the forward

    def sampler_state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_sampler_state_dict(self, state: dict[str, Any]) -> None:
        # Draws are a function of (seed, step): restoring the step restores them. A changed seed,
        # scale list or policy would silently change the draws, so refuse it.
        if state != self.sampler.state_dict():
            raise ValueError(
                f"the checkpoint's scale sampler {state} differs from this run's {self.sampler.state_dict()}"
            )

    def variant_scales(self, rows: int) -> list[int]:
        """The scale of each (row, scale) variant this step, rows repeated per scale under `all`."""
        if self.mqt_stage_one:
            return [self.tokens.mqt_queries] * rows
        if self.tokens.policy == "all":
            return [scale for scale in self.tokens.scales for _ in range(rows)]
        if self.tokens.policy == "sample_per_step":
            return [self.step_scale] * rows
        return self.sampler.row_scales(self.step, rows, self.micro_batch)

    def learned_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """Learned tokens per reported scale: each variant's row counts once at its drawn scale.

        Shrinking images drops only image tokens (never learned), and a variant's first token is never
        a target (`lay_out`), so a variant learns exactly its row's shifted labels.
        """
        per_row = learned_per_row(batch["labels"])
        rows = per_row.shape[0]
        variant_scales = self.variant_scales(rows)
        per_variant = per_row[torch.arange(len(variant_scales), device=per_row.device) % rows]
        # Which reported scale each variant trains, as a (variants, scales) 0/1 matrix made on the host.
        one_hot = [[float(v == s) for s in self.reported_scales] for v in variant_scales]
        return per_variant.float() @ torch.tensor(one_hot, device=per_row.device)

    # ── the pieces ────────────────────────────────────────────────────────────────────────────
    def at_scale(self, features: torch.Tensor, scale: int) -> torch.Tensor:
        if self.tokens.mode == "mqt":
            return features[:, :scale]  # queries are independent: the first m of M equal an m-query pass
        return pool_grid(features, scale, self.visual_grid)

    def kept_tokens(self, batch: dict[str, Any], scales: list[int]) -> dict[int, int] | None:
        """Tokens every image of the batch keeps at each scale, by the family's rule for the images' sizes, when
        every image gives the data's count (one size per batch); None when that is the scale itself (one grid
        per image, or MQT's query prefix) or when images differ (each its own count: `image_grids`)."""
        counts = self.counts_by_size(batch, scales)
        if counts is None or len({tuple(c) for c in counts}) > 1 or counts[0][0] != self.visual_tokens:
            return None
        return dict(zip(scales, counts[0][1:], strict=True))

    def counts_by_size(self, batch: dict[str, Any], scales: list[int]) -> list[list[int]] | None:
        """Each image's [full, *at each scale] token counts by the family's rule for its size (anyres), in
        pixel-value order; None for families whose count is the scale itself."""
        sizes = batch.get(IMAGE_SIZES) or []
        config, family = self.llava.config, self.family
        if self.tokens.mode != "m3" or not sizes or not family.counts_by_image_size:
            return None
        by_size = {size: [family.scale_tokens(config, s, size) for s in [None, *scales]] for size in map(tuple, sizes)}
        return [by_size[tuple(size)] for size in sizes]

    def image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: list[tuple[int, int]] | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The family's visual tokens, or with MQT after a family's own projector (`mtrain/model/mqt_head.py`)
        its M query outputs: (images, M, dim), with Qwen3-VL's DeepStack sets each read by the same queries."""
        features = super().image_features(pixel_values, image_sizes, grid)
        head = mqt_head(self.llava)
        return features if head is None else head.read_levels(features)

    def image_grids(self, batch: dict[str, Any], scales: list[int]) -> ImageGrids | None:
        """Each image's token counts at full size and at every scale, when the batch's images have their own
        grids (Qwen's native resolution, `image_grid_thw`) or anyres counts that differ (`size_grids`); None
        otherwise.

        A scale is a token count on the reference grid of `visual_tokens` tokens (the largest image's budget):
        its factor f = sqrt(visual_tokens / scale) pools every image by f per side, (t, h / f, w / f)."""
        grid_thw = batch.get(IMAGE_GRID_THW)
        if grid_thw is None:
            return self.size_grids(batch, scales)
        merge = self.llava.config.vision_config.spatial_merge_size
        factors = {s: reference_factor(self.visual_tokens, s) for s in scales}
        pooled = {s: [[t, h // f, w // f] for t, h, w in grid_thw] for s, f in factors.items()}
        tokens = {s: [t * (h // merge) * (w // merge) for t, h, w in rows] for s, rows in pooled.items()}
        full = [t * (h // merge) * (w // merge) for t, h, w in grid_thw]
        return ImageGrids(full=full, kept=tokens, pooled_thw=pooled)

    def size_grids(self, batch: dict[str, Any], scales: list[int]) -> ImageGrids | None:
        """Each image's counts by its size (anyres images of other sizes in one batch, each run expanded to its own
        count by the loader); None when every image has the data's count (`kept_tokens`) or no size rule."""
        counts = self.counts_by_size(batch, scales)
        if counts is None or self.kept_tokens(batch, scales) is not None:
            return None
        full = [c[0] for c in counts]
        # The loader expands every run to its image's count (collate's ROW_TOKENS mark its batches); a batch made by
        # hand is read once (a host sync): runs other than its images' counts would misplace every token after.
        held = sum(full) if ROW_TOKENS in batch else int((batch["input_ids"] == self.image_token_id).sum())
        if held != sum(full):
            by_size = dict(sorted((tuple(size), c[0]) for size, c in zip(batch[IMAGE_SIZES], counts, strict=True)))
            raise ValueError(
                f"{self.llava.config.model_type} counts each image's visual tokens from its size (height, width): "
                f"{by_size}, {sum(full)} in this batch, but its <image> runs hold {held}; the loader cuts each run "
                "to its image's own count from its size (data_pipeline.loader's image_tokens, given the family's count)"
            )
        kept = {s: [c[i] for c in counts] for i, s in enumerate(scales, start=1)}
        return ImageGrids(full=full, kept=kept)

    def scaled_visual(self, batch: dict[str, Any], scales: list[int], per_image: bool = False) -> dict[int, Any]:
        """Every image of the batch at every scale of `scales`: {scale: (images, tokens, dim)}, one vision pass
        (with images of their own grids or counts, `per_image`, {scale: [(tokens, dim) of each image]})."""
        grid_thw = batch.get(IMAGE_GRID_THW)
        if grid_thw is not None:
            merge = self.llava.config.vision_config.spatial_merge_size
            features = self.grid_features(batch["pixel_values"], grid_thw)
            grids = [(t, h // merge, w // merge) for t, h, w in grid_thw]
            factors = {s: reference_factor(self.visual_tokens, s) for s in scales}
            return {s: [pool_merged(f, g, factors[s]) for f, g in zip(features, grids, strict=True)] for s in scales}
        sizes = [tuple(size) for size in batch.get(IMAGE_SIZES) or []]
        if per_image:  # anyres images of other sizes: each its own count
            return self.family.scaled_image_features(self.llava, batch["pixel_values"], sizes, scales)
        if self.tokens.mode == "m3" and sizes and self.family.counts_by_image_size:
            scaled = self.family.scaled_features(self.llava, batch["pixel_values"], sizes, scales)
            if scaled is not None:
                return scaled
        features = self.image_features(batch["pixel_values"], sizes or None)  # anyres crops by the sizes
        return {s: self.at_scale(features, s) for s in scales}

    # ── the step ──────────────────────────────────────────────────────────────────────────────
    def forward(self, batch: dict[str, Any], scales: list[int] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss over the step's scales (or the given `scales`, each applied to every row)."""
        rows = batch["input_ids"].shape[0]
        variant_scales = [s for s in scales for _ in range(rows)] if scales is not None else self.variant_scales(rows)
        logits, layout, positions = self.run_learned(batch, variant_scales)
        return self.combine(next_token_losses(logits, positions), layout, positions)

    def run(self, batch: dict[str, Any], variant_scales: list[int]) -> tuple[torch.Tensor, Layout]:
        """Logits at every position of every (sample, scale) variant, from one vision pass and one LM pass.

        Variant i is row i % rows at scale `variant_scales[i]`. The losses take only the learned
        positions' logits (`run_learned`); these are every position's, as the stock model gives them.
        """
        logits, layout, _ = self.language_model_pass(batch, variant_scales, learned_only=False)
        return logits, layout

    def run_learned(
        self, batch: dict[str, Any], variant_scales: list[int]
    ) -> tuple[torch.Tensor, Layout, LearnedPositions]:
        """As `run`, with `lm_head` applied only at the layout's learned positions: logits (N, vocab)."""
        logits, layout, positions = self.language_model_pass(batch, variant_scales, learned_only=True)
        assert positions is not None
        return logits, layout, positions

    def language_model_pass(
        self, batch: dict[str, Any], variant_scales: list[int], learned_only: bool
    ) -> tuple[torch.Tensor, Layout, LearnedPositions | None]:
        """The layout of the variants, and `lm_head` over its last hidden state (at its learned positions
        only when `learned_only`).

        Every module runs exactly once, whatever scales this rank's rows drew: ZeRO-3 needs the
        same module sequence on every rank.
        """
        tokens, images = row_counts(batch, self.image_token_id, self.visual_tokens, self.pad_token_id)
        packed = self.tokens.layout == "packed"
        scales = sorted(set(variant_scales))
        grids = self.image_grids(batch, scales)  # images of their own grids or sizes: counts per image
        kept = None if grids is not None else self.kept_tokens(batch, scales)
        variants = place_variants(variant_scales, tokens, images, self.visual_tokens, packed, kept, grids)
        layout = lay_out(
            batch, variants, packed, self.image_token_id, self.visual_tokens, self.pad_token_id, kept, grids, images
        )
        embeddings = self.llava.get_input_embeddings()(layout.input_ids)
        visual_inputs: dict[str, Any] = {}  # what else of the images the language model takes (DeepStack)
        if sum(images):
            # The vision tower and projector run once per step, at full size, whatever scales were drawn.
            visual = visual_in_layout(self.scaled_visual(batch, scales, grids is not None), variants, images)
            image_positions = layout.input_ids == self.image_token_id
            embeddings, visual_inputs = self.family.splice_visual(self.llava, embeddings, image_positions, visual)
        else:
            embeddings = embeddings + self.vision_stand_in(embeddings.device).to(embeddings.dtype)
        if self.routing is not None:
            self.routing.set_rows(layout.token_scales)
        try:
            # The family's ids for this layout: 1-D per document (LLaVA), or Qwen's 3-D M-RoPE ids.
            positions = self.family.layout_position_ids(
                self.llava, layout, self.visual_grid, self.image_token_id, packed, self.tokens.mode == "mqt"
            )
            inputs = {"attention_mask": layout.attention_mask, "position_ids": positions}
            # The family's own attention inputs (Gemma 3's bidirectional image attention), from the pooled layout.
            inputs.update(self.family.language_model_inputs(self.llava, layout, self.image_token_id, packed))
            inputs.update(visual_inputs)
            # use_cache=False: with a cache, transformers ignores packed position ids and attends across variants.
            language_model = self.family.language_model(self.llava)
            hidden = language_model(inputs_embeds=embeddings, use_cache=False, **inputs).last_hidden_state
            if not learned_only:
                return self.llava.lm_head(hidden), layout, None
            # A variant learns exactly its row's shifted labels (`learned_tokens`): counted on the host.
            learned = learned_positions(layout.labels, learned_count(batch, [v.row for v in layout.variants]))
            if self.routing is not None:  # scale adapters on lm_head, if any, see the selected tokens' scales
                self.routing.set_rows(learned.gather(layout.token_scales))
            return learned_logits(hidden, self.llava.lm_head, learned), layout, learned
        finally:
            if self.routing is not None:
                self.routing.clear()

    @torch.no_grad()
    def evaluate_scale(self, batch: dict[str, Any], scale: int) -> dict[str, float]:
        """Summed loss, token accuracy and answer accuracy (every learned token right) at one scale."""
        rows = batch["input_ids"].shape[0]
        logits, layout, positions = self.run_learned(batch, [scale] * rows)  # one variant per row at one scale
        learned = positions.targets != IGNORE_INDEX
        right = (logits.argmax(-1) == positions.targets) & learned
        # Per layout row (one per input row at a single scale): its learned tokens predicted wrong.
        wrong = torch.zeros(layout.labels.shape[0], device=logits.device).index_add_(
            0, positions.rows, (learned & ~right).float()
        )
        return {
            "loss_sum": float(next_token_losses(logits, positions).sum()),
            "tokens": float(learned.sum()),
            "correct_tokens": float(right.sum()),
            "answers_correct": float((wrong == 0).sum()),
            "answers": float(rows),
        }

    def combine(
        self, token_losses: torch.Tensor, layout: Layout, positions: LearnedPositions
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The step's loss from the learned positions' token losses (N,), and its metrics."""
        device = token_losses.device
        learned = layout.labels[:, 1:] != IGNORE_INDEX
        target_scales = torch.where(learned, layout.token_scales[:, 1:], 0)
        # A position and its target lie in one variant: the position's scale is the target's.
        learned_scales = positions.gather(layout.token_scales)
        scales = self.reported_scales
        # Masked sums, not boolean indexing: indexing by a mask waits for the device to size its result.
        loss_sums = torch.stack([torch.where(learned_scales == s, token_losses, 0).sum() for s in scales])
        token_counts = torch.stack([(target_scales == s).sum() for s in scales]).to(loss_sums.dtype)
        # Divide by this micro-batch's counts, or by the step's global ones (`TokenNorm`): summed over
        # micro-batches and ranks, the latter give each scale's mean over every learned token of the step.
        norm = self.token_norm
        counts = token_counts if norm is None else norm.counts.to(loss_sums.dtype)
        if self.tokens.policy == "all" and not self.mqt_stage_one:
            weights = torch.tensor([self.scale_weights[s] for s in scales], dtype=loss_sums.dtype, device=device)
            weights = weights * (counts > 0)
            per_scale = loss_sums / counts.clamp(min=1)
            loss = (weights * per_scale).sum() / weights.sum()
        else:
            loss = loss_sums.sum() / counts.sum().clamp(min=1)
        if norm is not None:
            loss = loss * norm.divisor
        per_step = self.tokens.policy == "sample_per_step" and not self.mqt_stage_one
        step_scale = float(self.step_scale) if per_step else 0.0  # drawn on the host: no read of the layout
        metrics = {
            "tokens": (layout.token_scales > 0).sum(),
            "label_tokens": token_counts.sum().detach(),
            "scale_loss_sum": loss_sums.detach(),
            "scale_label_tokens": token_counts.detach(),
            # Summed over micro-batches and ranks by the trainer: identical draws leave a zero spread.
            "step_scale": torch.tensor(step_scale, device=device),
            "draws": torch.tensor(1.0, device=device),
            **draw_slots("step_scale", step_scale, self.micro_batch, device=device),
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
