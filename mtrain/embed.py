"""Embedding API: `Embedder.embed(inputs, dim=k, layer=l)` gives L2-normalised Matryoshka vectors.

    embedder = Embedder.from_checkpoint("runs/tiny_embed/checkpoints")   # or .from_export(folder)
    vectors = embedder.embed([image, "a red circle.", (image, "what colour?")], dim=16)

An input is a text, a PIL image, or an (image, text) pair whose text may place the image with
`<image>`. The export of an embedding model is the Hugging Face folder the checkpoint export
writes (`model/`) plus `embedding.json` (dims, layers, pooling) and, with a projection,
`embedding_head.safetensors`, and with an MRL-E classifier `classifier.safetensors`
(`Embedder.classify(inputs, dim=k)`), all written by `save_embedding_head`
(mtrain/checkpoint/embedding_export.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mtrain.checkpoint.embedding_export import (
    CLASSIFIER_FILE,
    EMBEDDING_FILE,
    HEAD_WEIGHTS_FILE,
    embedding_metadata,
    save_embedding_head,
)
from mtrain.model.embedding_head import truncate

__all__ = ["EmbedInput", "Embedder", "save_embedding_head"]

EmbedInput = str | Image.Image | tuple[Image.Image, str]


class Embedder:
    def __init__(self, task: Any, spec: Any, image_processor: Any) -> None:
        self.task = task.eval()
        self.spec = spec
        self.image_processor = image_processor
        self.metadata = embedding_metadata(task)

    @classmethod
    def from_checkpoint(cls, source: str | Path, overrides: Sequence[str] = ()) -> Embedder:
        """From a training checkpoint (or, with random weights, a config)."""
        from mtrain.engine.data import pair_spec  # noqa: PLC0415
        from mtrain.eval.budget import load_for_eval  # noqa: PLC0415
        from mtrain.task.registry import retrieval_view  # noqa: PLC0415

        cfg, built, task = load_for_eval(source, list(overrides))
        return cls(retrieval_view(cfg, built, task), pair_spec(cfg, built), built.image_processor)

    @classmethod
    def from_export(cls, export_dir: str | Path, overrides: Sequence[str] = ()) -> Embedder:
        """From an export folder: `model/` (Hugging Face) plus `embedding.json` from `save_embedding_head`;
        `overrides` of the model's config, such as a Qwen model's `model.image_size=[H,W]`."""
        from safetensors.torch import load_file  # noqa: PLC0415

        from mtrain.config import load_config  # noqa: PLC0415
        from mtrain.engine.data import pair_spec  # noqa: PLC0415
        from mtrain.model.build import build_model  # noqa: PLC0415
        from mtrain.task.registry import build_task  # noqa: PLC0415

        folder = Path(export_dir)
        if not (folder / EMBEDDING_FILE).is_file():
            raise FileNotFoundError(
                f"{folder} has no {EMBEDDING_FILE}; write it with save_embedding_head(task, folder)"
            )
        meta = json.loads((folder / EMBEDDING_FILE).read_text())
        # The policy only shapes training; embedding needs the width, pooling and projection.
        cfg = load_config(
            None,
            [
                "model.preset=none",
                f"model.path={folder / 'model'}",
                "task.objective=contrastive",
                f"task.contrastive.pooling={meta['pooling']}",
                f"task.contrastive.projection_dim={meta['projection_dim']}",
                f"matryoshka.dims.dims={meta['dims']}",
                f"matryoshka.dims.classes={meta.get('classes', 0)}",
                "checkpoint.export_at_end=false",  # this config only rebuilds the model
                *overrides,
            ],
        )
        built = build_model(cfg.model, torch.float32, None, cfg.run.seed)
        task = build_task(cfg, built, rank=0)
        if (folder / HEAD_WEIGHTS_FILE).is_file():
            task.head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS_FILE)), strict=True)
        if task.classifier is not None:
            task.classifier.load_state_dict(load_file(str(folder / CLASSIFIER_FILE)), strict=True)
        embedder = cls(task, pair_spec(cfg, built), built.image_processor)
        embedder.metadata = meta
        return embedder

    @torch.no_grad()
    def embed(
        self, inputs: Sequence[EmbedInput], dim: int | None = None, layer: int | None = None, instruction: str = ""
    ) -> torch.Tensor:
        """(len(inputs), dim) unit vectors: the first `dim` coordinates (default: the largest trained)
        of the embedding at `layer` (default: the last), re-normalised."""
        dim = dim or self.metadata["dims"][-1]
        layer = layer or self.metadata["last_layer"]
        if not 1 <= layer <= self.task.depth:
            raise ValueError(
                f"layer={layer} is outside 1..{self.task.depth}; trained layers: {self.metadata['layers']}"
            )
        return truncate(self.raw_embeddings(inputs, layer, instruction), dim)

    @torch.no_grad()
    def classify(self, inputs: Sequence[EmbedInput], dim: int | None = None, instruction: str = "") -> torch.Tensor:
        """(len(inputs), classes) MRL-E logits from the first `dim` coordinates (default: the largest trained)."""
        if self.task.classifier is None:
            raise ValueError("this model has no MRL-E classifier; train one with matryoshka.dims.classes=N")
        dim = dim or self.metadata["dims"][-1]
        if dim not in self.task.classifier.dims:
            raise ValueError(
                f"dim={dim} is not a trained dim; the classifier was trained at {self.task.classifier.dims}"
            )
        embeddings = self.raw_embeddings(inputs, self.metadata["last_layer"], instruction)
        return self.task.classifier.logits(embeddings, dim)

    def raw_embeddings(self, inputs: Sequence[EmbedInput], layer: int, instruction: str) -> torch.Tensor:
        """(len(inputs), width) pooled (and projected) embeddings at `layer`, before any truncation."""
        from data_pipeline.collate import IMAGE_GRID_THW  # noqa: PLC0415
        from data_pipeline.pairs import collate_side, encode_side  # noqa: PLC0415

        sides = []
        for item in inputs:
            image, text = (
                (item, "") if isinstance(item, Image.Image) else (None, item) if isinstance(item, str) else item
            )
            sides.append(encode_side(self.spec, image, text, instruction))
        with torch.device("cpu"):  # the batch is made on the host, whatever the default device
            batch = collate_side(sides, self.spec.tokenizer.pad_token_id, self.spec.image_size, self.image_processor)
        device = next(self.task.parameters()).device
        input_ids, mask, pixels = (batch[name].to(device) for name in ("input_ids", "attention_mask", "pixel_values"))
        # Each image's (height, width): anyres families crop by it; at native resolution each its own grid.
        sizes, grids = batch["image_sizes"] or None, batch.get(IMAGE_GRID_THW)
        return self.task.encode(input_ids, mask, pixels, [layer], sizes, grids)[0]
