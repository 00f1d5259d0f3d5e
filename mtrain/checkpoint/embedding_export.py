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
