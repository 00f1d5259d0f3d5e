"""The model folder fits mtrain and the config, checked before any process group forms.

`mtrain validate` (every launcher runs it before spawning anything) and every rank before
`init_distributed` call `check_model(cfg)`. It reads the folder's small files only (config.json,
the tokenizer), never weights:
- the folder's `model_type` has a family (mtrain/model/families); the error names those that do;
- the family trains the config's `task.objective` (`ModelFamily.objectives`), and generates when
  `eval.generate_samples` asks for it (`ModelFamily.generates`);
- the config's Matryoshka scales fit that model's visual-token grid (`ModelFamily.problems`; a
  qwen2_vl folder's grid comes from `model.image_size`; at native resolution, `model.image_pixels`, the
  scales are pooling factors of its reference grid and the family must have per-image grids);
- the tokenizer has a pad token, or an eos/unk token that `build_model` puts in its place (with a
  logged note): collating right-pads every row, so a tokenizer with none of them cannot train.
The built-in tiny preset is checked by the config itself (mtrain/config/schema.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_pipeline.shards import is_url


class ModelCheckError(ValueError):
    """The model folder cannot train with this config; the message says why and what to change."""


def folder_model_type(folder: Path) -> str:
    """`model_type` from config.json, read as plain JSON: an unknown type needs no transformers class."""
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelCheckError(f"model.path={str(folder)!r}: config.json is unreadable ({exc})") from None
    if not model_type:
        raise ModelCheckError(
            f"model.path={str(folder)!r}: config.json names no model_type; save it with save_pretrained"
        )
    return str(model_type)


def pad_token_problem(tokenizer: Any, where: str) -> str:
    """'' when the tokenizer pads, or has an eos/unk token that `build_model` pads with; the problem otherwise."""
    from mtrain.model.tokenizer import pad_stand_in  # noqa: PLC0415

    if tokenizer.pad_token is not None or pad_stand_in(tokenizer) is not None:
        return ""
    return (
        f"{where}: its tokenizer has no pad token and no eos or unk token to pad with; set one and save it "
        "(tokenizer.pad_token = '<pad>'; tokenizer.save_pretrained(folder))"
    )


def model_problems(cfg: Any) -> list[str]:
    """Every reason the model folder of `cfg` cannot train with it; empty for the tiny preset."""
    path = cfg.model.path
    if not path or is_url(path) or not (Path(path) / "config.json").is_file():
        return []  # the preset, or a missing folder, which check_inputs reports
    from mtrain.config.schema import generation_problem, mqt_head_problem  # noqa: PLC0415
    from mtrain.model.families import (  # noqa: PLC0415
        MQT_EXPORT_PREFIX,
        MQT_MODEL_TYPE,
        UnsupportedModelError,
        family_for,
    )
    from mtrain.model.mqt_head import mqt_export_types  # noqa: PLC0415

    where = f"model.path={path!r}"
    try:
        family = family_for(folder_model_type(Path(path)), where)
    except UnsupportedModelError as exc:
        return [str(exc)]
    from transformers import AutoTokenizer  # noqa: PLC0415

    from mtrain.model.build import load_model_config  # noqa: PLC0415

    config = load_model_config(path)  # an MQT folder's config without running its code
    if cfg.model.image_pixels:
        found = family.native_resolution_problems(config, cfg.matryoshka.tokens, cfg.model.image_pixels)
    else:
        found = family.problems(config, cfg.matryoshka.tokens, cfg.model.image_size)
    tokens = cfg.matryoshka.tokens
    if tokens.mode == "mqt" and family.model_type not in ("llava", MQT_MODEL_TYPE):
        # MQT after the family's own projector (mtrain/model/mqt_head.py; an MQT export of it): what it cannot do.
        limit = mqt_head_problem(tokens)
        found += [f"{limit[0]}: {limit[1]}"] if limit else []
        stock_type = family.model_type.removeprefix(MQT_EXPORT_PREFIX)
        if cfg.checkpoint.export_at_end and stock_type not in mqt_export_types():
            found.append(
                f"checkpoint.export_at_end: the Hugging Face export does not hold MQT's query transformer after a "
                f"{family.model_type} model's projector yet (mtrain/model/mqt_families.py covers "
                f"{', '.join(mqt_export_types())}); set checkpoint.export_at_end=false and evaluate with mtrain eval"
            )
    if cfg.eval.generate_samples and not family.generates and not any("eval.generate_samples" in p for p in found):
        key, problem = generation_problem(f"a {config.model_type} model")
        found.append(f"{key}: {problem}")
    if cfg.task.objective not in family.objectives:
        found.append(f"task.objective={cfg.task.objective} does not train a {config.model_type} model yet")
    problems = [f"{where}: {problem}" for problem in found]
    pad = pad_token_problem(AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False), where)
    return problems + ([pad] if pad else [])


def check_model(cfg: Any) -> None:
    """Raise ModelCheckError naming every problem `model_problems` finds."""
    problems = model_problems(cfg)
    if problems:
        raise ModelCheckError("; ".join(problems))
