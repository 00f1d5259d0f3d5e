"""The `Task` every objective implements: the one module DeepSpeed wraps.

The trainer and the checkpointer talk to a task only through these methods; a task that needs
none of the optional behaviour inherits the defaults here.

    forward(batch)                 -> (loss, metrics): metrics are device tensors, summed over
                                      micro-batches and ranks by the trainer
    image_features(pixels)         the vision path's visual tokens: (images, tokens, dim)
    vision_stand_in(device)        a text-only micro-batch's zero-weighted vision pass (ZeRO-3 lockstep)
    begin_step(step, micro_batch)  the per-micro-batch hook: draws that depend on (seed, step, micro-batch)
    learned_tokens(batch)          a micro-batch's learned tokens per loss group, or None (not a token mean)
    token_norm                     set by the trainer for a step: the global counts the loss divides by
    forward_backward(batch, f, b)  one micro-batch's forward and backward; GradCache overrides it
    summarize(totals)              loggable floats from the metrics summed over ranks
    sampler_state_dict() / load_sampler_state_dict(state)   what checkpoints keep per rank
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.model.families import ModelFamily, family_for

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TokenNorm:
    """One optimizer step's global token normalisation (HF's `num_items_in_batch`, made exact under DeepSpeed).

    A micro-batch's loss is its summed token losses over the step's global learned-token count,
    times `divisor`: DeepSpeed divides each backward by the micro-batches of a step and averages
    gradients over data-parallel ranks, so multiplying by both back makes the applied gradient
    the sum over every micro-batch and rank, the gradient of one process holding the global batch.
    """

    counts: torch.Tensor  # the step's learned tokens per loss group (scale), summed over micro-batches and ranks
    divisor: float  # gradient accumulation steps x data-parallel ranks


def learned_per_row(labels: torch.Tensor) -> torch.Tensor:
    """Each row's target tokens of the next-token loss: labels from the second column on (the shift)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


class Task(nn.Module):
    # The family a task was built with (None: the registry's for the model's type) and the merged grid
    # of every image's tokens (None: the family knows it, or a square grid); set by the tasks that take them.
    given_family: ModelFamily | None = None
    visual_grid: tuple[int, int] | None = None

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.token_norm: TokenNorm | None = None  # None: each micro-batch's own token mean (evaluation too)

    @property
    def llava(self) -> nn.Module:
        """The LlavaForConditionalGeneration inside (PEFT-wrapped or not)."""
        get_base_model = getattr(self.model, "get_base_model", None)  # PEFT's wrapper, when LoRA is on
        return get_base_model() if get_base_model is not None else self.model

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype floating-point inputs (pixel values) are cast to."""
        return self.model.dtype

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError

    @property
    def family(self) -> ModelFamily:
        """What mtrain knows about the model's kind (mtrain/model/families): the one the task was given,
        else the registry's for the model's type."""
        return self.given_family or family_for(self.llava.config.model_type)

    def image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: list[tuple[int, int]] | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Projected visual tokens of every image at full size: (images, tokens, dim), by the family's rule
        (anyres families crop by the batch's `image_sizes`, Qwen's by its merged grid: `grid`, else the
        task's)."""
        return self.family.image_features(self.llava, pixel_values, grid or self.visual_grid, image_sizes)

    def grid_features(self, pixel_values: torch.Tensor, image_grid_thw: list[list[int]]) -> list[torch.Tensor]:
        """Each image's projected tokens, (tokens, dim), for images of their own grids (Qwen's native
        resolution: `pixel_values` every image's patches in one sequence, `image_grid_thw` a host list)."""
        grid_thw = torch.tensor(image_grid_thw, device=pixel_values.device)
        return self.family.grid_features(self.llava, pixel_values.to(self.input_dtype), grid_thw)

    @property
    def stand_in_grid(self) -> tuple[int, int] | None:
        """The merged grid of the blank image a text-only batch runs: the task's, else the family's own."""
        return self.visual_grid or self.family.stand_in_grid

    def stand_in_pixels(self, device: torch.device) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        """One blank image the vision path accepts (and its image_sizes, for anyres), on `device` in the input dtype."""
        return self.family.stand_in_input(self.llava.config, self.stand_in_grid, self.input_dtype, device)

    def vision_stand_in(self, device: torch.device) -> torch.Tensor:
        """Zero, computed through the whole vision path on a blank image: add it to a text-only batch's embeddings.

        Under ZeRO-3 every rank must gather (forward) and reduce (backward) the same parameters in
        the same order every step; a rank that skipped the vision path while another ran it would
        hang both. Multiplying by zero keeps the loss and every gradient exactly the text's own.
        """
        features = self.image_features(*self.stand_in_pixels(device), grid=self.stand_in_grid)
        return features.sum() * 0

    def begin_step(self, step: int, micro_batch: int = 0) -> None:
        """Called before each micro-batch of an optimizer step, on every rank: the references draw
        their Matryoshka structure per forward, so each accumulated micro-batch draws anew."""

    def learned_tokens(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """This rank's learned tokens of one micro-batch, one count per loss group (after `begin_step`).

        None: the loss is not a mean over tokens (contrastive pairs), so nothing is normalised.
        Read from the batch as the loader made it (host tensors): no wait on the device.
        """
        return None

    def forward_backward(
        self,
        batch: dict[str, Any],
        forward: Callable[..., Any],
        backward: Callable[[torch.Tensor], Any],
    ) -> tuple[torch.Tensor, Metrics]:
        """Forward through `forward` (the DeepSpeed engine, or the task itself) and backward through `backward`."""
        loss, metrics = forward(batch)
        backward(loss)
        return loss, metrics

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loggable values from this task's metrics, summed over micro-batches and ranks."""
        return {}

    def sampler_state_dict(self) -> dict[str, Any]:
        return {}

    def load_sampler_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `sampler_state_dict` saved (nothing, by default)."""
