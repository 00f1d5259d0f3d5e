"""The embedding model's part of an export: `embedding.json`, the projection head's weights and the
MRL-E classifier's.

Written beside the Hugging Face `model/` folder the checkpoint export writes; `mtrain.embed`
reads both back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtrain.launch.preflight import is_partitioned

EMBEDDING_FILE = "embedding.json"
HEAD_WEIGHTS_FILE = "embedding_head.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"


def embedding_metadata(task: Any) -> dict[str, Any]:
    """What a reader of exported embeddings needs: the trained dims and layers, and how they were pooled."""
    return {
        "dims": list(task.dims),
        "layers": task.evaluated_layers(),
        "last_layer": task.depth,
        "policy": task.dims_config.policy,
        "pooling": task.contrastive.pooling,
        "projection_dim": task.contrastive.projection_dim,
        "width": task.head.out_width,
        "query_instruction": task.contrastive.query_instruction,
        "classes": task.dims_config.classes,
    }


def embedding_width(cfg: Any, built: Any) -> int:
    """The width of the trained embedding: the projection's, else the language model's hidden size."""
    return cfg.task.contrastive.projection_dim or built.model.config.text_config.hidden_size


def write_matryoshka_dimensions(model_folder: Path, dims: list[int]) -> None:
    """Record the trained embedding sizes in the exported `config.json`, where serving stacks look for them.

    vLLM reads `matryoshka_dimensions` from the Hugging Face config (`vllm/config/model.py`:
    `ModelConfig.is_matryoshka` is true when `hf_config.matryoshka_dimensions` is non-empty or
    `hf_config.is_matryoshka` is set; `ModelConfig.matryoshka_dimensions` is the list that an
    embedding request's `dimensions` must belong to). sentence-transformers takes the size as
    `SentenceTransformer(..., truncate_dim=k)` and stores none in its own files, so `matryoshka_dimensions`
    (and `embedding.json`) is where a user finds the sizes to pass.
    """
    config_file = model_folder / "config.json"
    config = json.loads(config_file.read_text())
    config["matryoshka_dimensions"] = list(dims)
    config["is_matryoshka"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_embedding_head(task: Any, export_dir: str | Path, write: bool = True) -> Path:
    """Write `embedding.json` (and the projection and classifier weights, if any) beside an export's `model/` folder.

    Under ZeRO-3 every rank must call this (the head's partitions are gathered); only `write` ranks write.
    """
    import deepspeed  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(export_dir)
    states = {}
    for file, module in ((HEAD_WEIGHTS_FILE, task.head), (CLASSIFIER_FILE, task.classifier)):
        if module is None:
            continue
        partitioned = [p for p in module.parameters() if is_partitioned(p)]
        with deepspeed.zero.GatheredParameters(partitioned, enabled=bool(partitioned)):
            states[file] = {name: value.detach().clone().contiguous() for name, value in module.state_dict().items()}
    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / EMBEDDING_FILE).write_text(json.dumps(embedding_metadata(task), indent=1))
        for file, state in states.items():
            if state:
                save_file(state, str(out / file))
    return out
