"""Metric sinks behind one interface; ranks other than 0 get the no-op sink."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Protocol


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """Accepts everything, writes nothing: used off rank 0 and when a sink is switched off."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """One JSON object per logged step, with `step` first."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        # purge_step: a resumed run logs again from there; TensorBoard hides the old run's events from
        # that step on (as metrics.jsonl is trimmed), so no step appears twice.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


def require_wandb() -> None:
    """Fail with the fix when `logging.wandb` is on but the optional package is missing."""
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(
            "logging.wandb=true needs the wandb package: pip install 'mtrain[wandb]' (or set logging.wandb=false)"
        )


class WandbSink:
    """Weights & Biases run under <run_dir>/wandb; offline mode writes files for a later `wandb sync`."""

    def __init__(self, run_dir: Path, project: str, name: str, mode: str, config: dict[str, Any]) -> None:
        require_wandb()
        import wandb  # noqa: PLC0415

        # console="off": mtrain's progress bar and prints stay on the terminal, not in W&B's log copy.
        settings = wandb.Settings(silent=True, console="off", disable_git=True, x_disable_stats=True)
        self.run = wandb.init(
            project=project,
            name=name,
            dir=str(run_dir),
            mode=mode,
            config=config,
            settings=settings,
            reinit="create_new",
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class SinkGroup:
    """Fans one log call out to several sinks."""

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
