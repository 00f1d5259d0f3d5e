"""Right-padding rows of token ids into a batch: the one collate every batch form uses.

Besides the padded tensors a batch carries, per row, how many real tokens and images it holds and
how many targets it learns (`ROW_TOKENS`, `ROW_IMAGES`, `ROW_LEARNED`, plain lists). They are known
on the host when the batch is made, so the Matryoshka layout (mtrain/task/token_layout.py),
GradCache's chunking and the learned-position logits (mtrain/task/next_token.py) size their tensors
from them without reading anything back from the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ROW_TOKENS = "row_tokens"  # real (non-padding) tokens of each row
ROW_IMAGES = "row_images"  # images of each row, in the order of the batch's pixel values
# Learned targets of each row: labels after the next-token shift (from the second column on) that are
# not IGNORE. The tasks size their logits' selection from it (mtrain/task/next_token.py); a batch whose
# labels change after collate must drop it.
ROW_LEARNED = "row_learned"
# (height, width) of every image as decoded, in pixel-value order (host list): anyres families pick
# their crops from it (`image_sizes` of LLaVA-NeXT/OneVision).
IMAGE_SIZES = "image_sizes"
# (t, h, w) in patches of every image, in pixel-value order (host list), when images have their own
# grids (Qwen's native resolution): the batch's `pixel_values` are then every image's patches in one
# sequence, as Qwen's processor gives them, and each image's tokens count t * h * w / merge^2.
IMAGE_GRID_THW = "image_grid_thw"


def right_pad(rows: Sequence[Sequence[int]], pad_value: int, width: int | None = None) -> torch.Tensor:
    """(len(rows), width) long tensor: each row's values from column 0, `pad_value` after them."""
    width = max(len(row) for row in rows) if width is None else width
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def real_token_mask(lengths: Sequence[int], width: int) -> torch.Tensor:
    """(rows, width) long mask: 1 on each row's first `length` columns, 0 on its padding."""
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
