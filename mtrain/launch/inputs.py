"""The files a run reads exist: checked by `mtrain validate` (every launcher runs it before spawning
anything) and by every rank before its process group forms.

URLs (http://, s3://, pipe:...) are never checked here. Keys listed in `run.remote_paths` name
paths that exist only where the ranks run (a cluster filesystem the submitting machine does not
mount): `validate` skips them, the ranks still check them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.shards import is_url


def missing_inputs(cfg: Any, skip: tuple[str, ...] | list[str] = ()) -> list[str]:
    """One problem per missing input, naming its key and the fix; keys in `skip` are not checked."""
    problems = []
    model_path = cfg.model.path
    if "model.path" not in skip and model_path and not is_url(model_path):
        if not (Path(model_path) / "config.json").is_file():
            problems.append(
                f"model.path={model_path!r} is not a Hugging Face model folder (no config.json); "
                "point it at a local folder written by save_pretrained"
            )
    init_from = cfg.checkpoint.init_from
    if "checkpoint.init_from" not in skip and init_from and not Path(init_from).exists():
        problems.append(
            f"checkpoint.init_from={init_from!r} does not exist; "
            "give a checkpoint, an export folder or a Hugging Face model folder"
        )
    if "data.shards" not in skip:
        problems += [missing_shards(pattern, "data.shards") for pattern, _ in cfg.data.source_list]
    if "eval.shards" not in skip and cfg.eval.shards:
        problems.append(missing_shards(cfg.eval.shards, "eval.shards"))
    return [problem for problem in problems if problem]


def missing_shards(pattern: str, key: str) -> str:
    """A problem naming `key` when local shards of `pattern` are missing, else ''."""
    from data_pipeline.shards import expand_shards  # noqa: PLC0415

    missing = [url for url in expand_shards(pattern) if not is_url(url) and not Path(url).is_file()]
    if not missing:
        return ""
    return (
        f"{key}: {len(missing)} shard(s) not found, first {missing[0]!r}; "
        "write the sample shards with `mtrain data sample` or point it at your own"
    )


def check_shards_exist(pattern: str, key: str) -> None:
    problem = missing_shards(pattern, key)
    if problem:
        raise FileNotFoundError(problem)


def check_inputs(cfg: Any, on_submit_host: bool = False) -> None:
    """Raise FileNotFoundError naming every missing input.

    `on_submit_host`: `mtrain validate` before a launch, which skips the keys in `run.remote_paths`.
    """
    problems = missing_inputs(cfg, cfg.run.remote_paths if on_submit_host else ())
    if problems:
        hint = " (a path that exists only where the ranks run: list its key in run.remote_paths)"
        raise FileNotFoundError("; ".join(problems) + (hint if on_submit_host else ""))
