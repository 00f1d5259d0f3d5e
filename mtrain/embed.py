"""Embedding API: `Embedder.embed(inputs, dim=k, layer=l)` gives L2-normalised Matryoshka vectors.

    embedder = Embedder.from_checkpoint("runs/tiny_embed/checkpoints")   # or .from_export(folder)
    vectors = embedder.embed([image, "a red circle.", (image, "what colour?")], dim=16)

An input is a text, a PIL image, or an (image, text) pair whose text may place the image with
`<image>`. The export of an embedding model is the Hugging Face folder the checkpoint export
writes (`model/`) plus `embedding.json` (dims, layers, pooling) and, with a projection,
`embedding_head.safetensors`, and with an MRL-E classifier `classifier.safetensors`
(`Embedder.classify(inputs, dim=k)`), all written by `save_embedding_head`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mtrain.model.embedding_head import truncate

EMBEDDING_FILE = "embedding.json"
HEAD_WEIGHTS_FILE = "embedding_head.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"

EmbedInput = str | Image.Image | tuple[Image.Image, str]


def embedding_metadata(task: Any) -> dict[str, Any]:
    """What a reader of exported embeddings needs: the trained dims and layers, and how they were pooled."""
    from mtrain.eval.retrieval import evaluated_layers  # noqa: PLC0415

    return {
        "dims": list(task.dims),
        "layers": evaluated_layers(task),
        "last_layer": task.depth,
        "policy": task.dims_config.policy,
        "pooling": task.contrastive.pooling,
        "projection_dim": task.contrastive.projection_dim,
        "width": task.head.out_width,
        "query_instruction": task.contrastive.query_instruction,
        "classes": task.dims_config.classes,
    }


def save_embedding_head(task: Any, export_dir: str | Path, write: bool = True) -> Path:
    """Write `embedding.json` (and the projection weights, if any) beside an export's `model/` folder.

    Under ZeRO-3 every rank must call this (the head's partitions are gathered); only `write` ranks write.
    """
    import deepspeed  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(export_dir)
    states = {}
    for file, module in ((HEAD_WEIGHTS_FILE, task.head), (CLASSIFIER_FILE, task.classifier)):
        if module is None:
            continue
        partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(partitioned, enabled=bool(partitioned)):
            states[file] = {name: value.detach().clone().contiguous() for name, value in module.state_dict().items()}
    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / EMBEDDING_FILE).write_text(json.dumps(embedding_metadata(task), indent=1))
        for file, state in states.items():
            if state:
                save_file(state, str(out / file))
    return out


class Embedder:
    def __init__(self, task: Any, spec: Any, image_processor: Any) -> None:
        self.task = task.eval()
        self.spec = spec
        self.image_processor = image_processor
        self.metadata = embedding_metadata(task)

    @classmethod
    def from_checkpoint(cls, source: str | Path, overrides: Sequence[str] = ()) -> Embedder:
        """From a training checkpoint (or, with random weights, a config)."""
        from mtrain.engine.run import pair_spec  # noqa: PLC0415
        from mtrain.eval.budget import load_for_eval  # noqa: PLC0415
        from mtrain.eval.retrieval import retrieval_view  # noqa: PLC0415

        cfg, built, task = load_for_eval(source, list(overrides))
        return cls(retrieval_view(cfg, built, task), pair_spec(cfg, built), built.image_processor)

    @classmethod
    def from_export(cls, export_dir: str | Path) -> Embedder:
        """From an export folder: `model/` (Hugging Face) plus `embedding.json` from `save_embedding_head`."""
        from safetensors.torch import load_file  # noqa: PLC0415

        from mtrain.config import load_config  # noqa: PLC0415
        from mtrain.engine.run import pair_spec  # noqa: PLC0415
        from mtrain.engine.setup import build_task  # noqa: PLC0415
        from mtrain.model.build import build_model  # noqa: PLC0415

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
        from data_pipeline.pairs import collate_side, encode_side  # noqa: PLC0415

        sides = []
        for item in inputs:
            image, text = (
                (item, "") if isinstance(item, Image.Image) else (None, item) if isinstance(item, str) else item
            )
            sides.append(encode_side(self.spec, image, text, instruction))
        batch = collate_side(sides, self.spec.tokenizer.pad_token_id, self.spec.image_size, self.image_processor)
        return self.task.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], [layer])[0]
