"""Image preprocessing through the model's image processor, with a fast path for the common case.

CLIP-style processors (resize the shortest edge, centre crop, rescale, normalise) are applied
here with PIL and NumPy directly, reading the processor's own settings: the result matches the
processor's output, without its per-call overhead. Any other processor is called as is.
JPEGs are also decoded at a reduced scale (`draft_size`, PIL's DCT scaling) when the processor
shrinks them anyway, which is where most of the decode time goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


@dataclass(frozen=True)
class ClipSteps:
    shortest_edge: int
    crop: tuple[int, int]
    resample: int
    scale: float
    mean: np.ndarray
    std: np.ndarray


def clip_steps(processor: Any) -> ClipSteps | None:
    """The processor's settings when it is a plain resize/crop/rescale/normalise pipeline, else None."""
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    shortest = _get(size, "shortest_edge") if size is not None else None
    plain = (
        shortest
        and not _get(size, "longest_edge")
        and crop is not None
        and _get(crop, "height")
        and getattr(processor, "do_resize", False)
        and getattr(processor, "do_center_crop", False)
        and getattr(processor, "do_rescale", False)
        and getattr(processor, "do_normalize", False)
        and not getattr(processor, "do_pad", False)
        and not getattr(processor, "image_grid_pinpoints", None)  # anyres (LLaVA-NeXT) crops are no plain pipeline
    )
    if not plain:
        return None
    return ClipSteps(
        shortest_edge=int(shortest),
        crop=(int(_get(crop, "height")), int(_get(crop, "width"))),
        resample=int(getattr(processor, "resample", Image.BICUBIC)),
        scale=float(processor.rescale_factor),
        mean=np.asarray(processor.image_mean, dtype=np.float32).reshape(3, 1, 1),
        std=np.asarray(processor.image_std, dtype=np.float32).reshape(3, 1, 1),
    )


class ImagePreprocessor:
    """PIL image -> pixel tensor (3, H, W), as the model's image processor would make it.

    `prepare` does the per-image work (resize and crop, still uint8 on the fast path); `stack`
    writes the batch tensor, rescaled and normalised through a per-channel lookup table.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.steps = clip_steps(processor)
        if self.steps is not None:
            # Rescale and normalise as one lookup per channel: 256 values each, computed once.
            levels = np.arange(256, dtype=np.float32)[None, :]
            steps = self.steps
            self.lookup = ((levels * np.float32(steps.scale) - steps.mean[:, 0]) / steps.std[:, 0]).astype(np.float32)

    @property
    def draft_size(self) -> int | None:
        """Decode JPEGs at the smallest DCT scale whose short side still covers this."""
        return self.steps.shortest_edge if self.steps else None

    @property
    def variable_patches(self) -> bool:
        """Whether images differ in patch count (Qwen's native resolution): a batch joins every image's
        patches into one sequence, and each image carries its `image_grid_thw` row."""
        return bool(getattr(self.processor, "variable_patches", False))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.stack([self.prepare(image)])[0]

    def prepare_with_grid(self, image: Image.Image) -> tuple[np.ndarray | torch.Tensor, list[int] | None]:
        """`prepare`, and the image's (t, h, w) in patches where images differ in patch count (else None)."""
        if not self.variable_patches:
            return self.prepare(image), None
        out = self.processor(images=image, return_tensors="pt")
        return out["pixel_values"][0], out["image_grid_thw"][0].tolist()

    def prepare(self, image: Image.Image) -> np.ndarray | torch.Tensor:
        if self.steps is None:
            return self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        steps = self.steps
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = steps.shortest_edge, int(steps.shortest_edge * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        crop_h, crop_w = steps.crop
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        # Resize the whole image, then crop: resizing only the kept box is faster, but PIL's
        # intermediate rounding then differs from the processor's output by a few levels.
        resized = image if (new_w, new_h) == (width, height) else image.resize((new_w, new_h), resample=steps.resample)
        cropped = resized.crop((left, top, left + crop_w, top + crop_h))
        return np.asarray(cropped)

    def stack(self, prepared: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
        if self.variable_patches:
            return torch.cat(prepared)  # (patches of every image, dim), as Qwen's processor joins them
        if self.steps is None:
            return stack_crops(prepared)
        crop_h, crop_w = self.steps.crop
        batch = np.empty((len(prepared), 3, crop_h, crop_w), dtype=np.float32)
        for slot, pixels in zip(batch, prepared, strict=True):
            for channel in range(3):
                np.take(self.lookup[channel], pixels[:, :, channel], out=slot[channel])
        return torch.from_numpy(batch)


def stack_crops(prepared: list[torch.Tensor]) -> torch.Tensor:
    """One tensor of every image's pixels. Anyres images (crops, 3, H, W) with different crop counts are
    zero-padded to the most crops, as LLaVA-NeXT's processor pads a batch (the model reads each image's real
    crops from its `image_sizes`)."""
    shapes = {tuple(pixels.shape) for pixels in prepared}
    if len(shapes) == 1:
        return torch.stack(prepared)
    if len({shape[1:] for shape in shapes}) == 1 and all(len(shape) == 4 for shape in shapes):
        most = max(shape[0] for shape in shapes)
        padded = [torch.cat([p, p.new_zeros((most - p.shape[0], *p.shape[1:]))]) for p in prepared]
        return torch.stack(padded)
    raise ValueError(
        f"the image processor gave images of shapes {sorted(shapes)}, which no batch stacks; give the processor "
        "one output size (or crops of one size, for anyres)"
    )
