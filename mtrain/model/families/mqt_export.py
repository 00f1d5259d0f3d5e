"""mtrain's MQT exports of the families that keep their own projector, read back: `mtrain_mqt_<family>`.

`mtrain export` saves MQT after a family's projector as that family's stock class plus the query transformer
(`mtrain/model/mqt_families.py`, model type `mtrain_mqt_qwen2_vl` and so on). mtrain reads such a folder as the
model a fresh MQT run of the family trains: the family's stock model with the query transformer attached after
its projector (`mtrain/model/mqt_head.py`), every weight, the head's included, from the folder
(`mtrain.model.build`). So `model.path` and `checkpoint.init_from` continue training it, `mtrain eval` and
`mtrain generate` run it, and its export is again an `mtrain_mqt_<family>` folder, as the first run's was.

Its family here is the stock family's, except that every image stands for the folder's `mqt_queries` query tokens,
and the run must train MQT with the folder's head (`matryoshka.tokens.mode=mqt`, its `mqt_queries` and `mqt_heads`):
a run without it would drop the trained head or read it with another shape. Checked before any process group.
"""

from __future__ import annotations

from typing import Any

from mtrain.model.families.base import ModelFamily

MQT_EXPORT_PREFIX = "mtrain_mqt_"  # `mqt_families.MQT_MODEL_TYPE_PREFIX`, spelled out: that file imports every family


class MQTExportFamily(ModelFamily):
    """What an MQT export of a family changes in the family (mixed in before it, `mqt_export_family`)."""

    stock_type: str = ""  # the family's own model type

    def visual_tokens(self, config: Any) -> int:
        return config.mqt_queries  # the query outputs, whatever the image's size

    def visual_grid(self, config: Any) -> tuple[int, int] | None:
        return None  # queries, not a patch grid

    def problems(self, config: Any, tokens: Any, image_size: list[int] | None = None) -> list[str]:
        return self.head_problems(config, tokens) or super().problems(config, tokens, image_size)

    def head_problems(self, config: Any, tokens: Any) -> list[str]:
        """What keeps `tokens` (a TokenScalesConfig) from training the folder's query transformer."""
        if tokens.mode != "mqt":
            return [
                f"this is an MQT model (a query transformer after its {self.stock_type} projector: each image becomes "
                f"{config.mqt_queries} query tokens); set matryoshka.tokens.mode=mqt to train or evaluate it"
            ]
        differing = [
            f"matryoshka.tokens.{name}={getattr(config, name)!r} (the config has {getattr(tokens, name)!r})"
            for name in ("mqt_queries", "mqt_heads")
            if getattr(config, name) != getattr(tokens, name)
        ]
        return [f"its query transformer has another shape; set {', '.join(differing)}"] if differing else []


def mqt_export_family(family: ModelFamily, export_class: str) -> ModelFamily:
    """The family of `family`'s MQT exports: `MQTExportFamily` before `family`'s class, whose every other hook it
    keeps; `export_class` is the registered class that loads such a folder in transformers (mqt_families.py)."""
    fields = {
        "model_type": MQT_EXPORT_PREFIX + family.model_type,
        "stock_type": family.model_type,
        "model_class_path": f"mtrain.model.mqt_families:{export_class}",
    }
    return type(f"MQTExport{type(family).__name__}", (MQTExportFamily, type(family)), fields)()
