"""The Checkpointer: what `run.py` calls to resume, start from other weights, and save.

    prepare_resume()  before the engine exists: which checkpoint to resume from (partials removed),
                  config mismatch check, universal conversion at another world size
    model_config()  the model source, replaced by `checkpoint.init_from` when set
    load_init_adapters()  after the model is built: the init_from source's adapters, when kept
    restore()     after the engine exists: engine, trainer, every rank's data position, RNG
    save()        crash-safe save (see `save.py`)

Rank 0 does the file work; failures there are broadcast, so every rank raises the same error
instead of waiting at a barrier.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtrain import __version__
from mtrain.checkpoint.export import ADAPTER_DIR, save_adapter_gathered
from mtrain.checkpoint.init_from import init_from_folder, init_from_start, load_kept_adapters
from mtrain.checkpoint.manifest import manifest_problems
from mtrain.checkpoint.resume import (
    CheckpointInfo,
    check_config_matches,
    find_resume_checkpoint,
    load_data_states,
    load_rank_state,
    restore_rng,
)
from mtrain.checkpoint.save import RankState, Retention, save_checkpoint
from mtrain.checkpoint.universal import convert_to_universal, universal_folder
from mtrain.config import TrainConfig, config_hash
from mtrain.config.core import to_dict
from mtrain.config.schema import ModelConfig
from mtrain.launch.distributed import print0, run_on_main
from mtrain.launch.env import WorldInfo
from mtrain.task.base import Task


class Checkpointer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, world: WorldInfo) -> None:
        self.cfg = cfg
        self.world = world
        self.root = run_dir / "checkpoints"
        self.run_dir = run_dir
        self.resume_from: CheckpointInfo | None = None
        self.universal = False
        self.config_yaml = ""
        self.init_adapters: Path | None = None  # the init_from source's adapters, when kept

    # ── before the engine ─────────────────────────────────────────────────────────────────────
    def prepare_resume(self, ds_config: dict[str, Any]) -> dict[str, Any]:
        """Pick the checkpoint to resume from; at another world size convert it to the universal format.

        Returns the DeepSpeed config to build the engine with: `ds_config`, or a copy that loads
        the universal checkpoint.
        """
        cfg = self.cfg
        folder = run_on_main(self._find_on_rank0, "checkpoint")
        if folder is None:
            return ds_config
        checkpoint = find_resume_checkpoint(folder, self.root, remove_partials=False)
        for change in check_config_matches(checkpoint, to_dict(cfg)):
            print0(f"warning: resuming with a changed config: {change}")
        if checkpoint.world_size != self.world.world_size:
            print0(
                f"checkpoint: {checkpoint.folder.name} was saved by {checkpoint.world_size} rank(s), this run has "
                f"{self.world.world_size}: converting to DeepSpeed's universal format"
            )
            run_on_main(lambda: str(convert_to_universal(checkpoint.folder)), "checkpoint")
            ds_config = ds_config | {"checkpoint": {"load_universal": True}}
            self.universal = True
        self.resume_from = checkpoint
        return ds_config

    def _find_on_rank0(self) -> str | None:
        resume = self.cfg.checkpoint.resume
        # Partial folders are removed from this run's own folder only; another run's are left alone.
        checkpoint = find_resume_checkpoint(resume, self.root, remove_partials=resume == "auto")
        if checkpoint is None:
            return None
        if self.cfg.checkpoint.verify_checksums:
            problems = manifest_problems(checkpoint.folder, checksums=True)
            if problems:
                raise ValueError(f"checkpoint {checkpoint.folder} fails its manifest: {'; '.join(problems)}")
        return str(checkpoint.folder)

    def model_config(self) -> ModelConfig:
        """The model source: `checkpoint.init_from`'s weights when set (exported once on rank 0)."""
        source = self.cfg.checkpoint.init_from
        if not source:
            return self.cfg.model
        run_on_main(lambda: str(init_from_folder(source, self.run_dir, create=True)), "checkpoint")
        start = init_from_start(
            init_from_folder(source, self.run_dir, create=False), self.cfg.checkpoint.init_from_adapters
        )
        self.init_adapters = start.adapters
        print0(f"init_from: weights from {start.model} (fresh optimizer, schedule and data)")
        return dataclasses.replace(self.cfg.model, preset="none", path=str(start.model))

    def load_init_adapters(self, model: Any) -> None:
        """Every adapter of the init_from source into the run's adapters of the same names (a no-op without)."""
        if self.init_adapters is None:
            return
        frozen = self.cfg.checkpoint.init_from_adapters == "freeze"
        names = load_kept_adapters(model, self.init_adapters, frozen)
        print0(f"init_from: adapters {names} from {self.init_adapters} ({'frozen' if frozen else 'training on'})")

    # ── after the engine ──────────────────────────────────────────────────────────────────────
    def restore(self, engine: Any, trainer: Any, loader: Any) -> None:
        """Load engine, trainer, data and RNG state from the planned checkpoint (no-op without one)."""
        checkpoint = self.resume_from
        if checkpoint is None:
            return
        load_dir = universal_folder(checkpoint.folder).parent if self.universal else checkpoint.folder.parent
        engine.load_checkpoint(str(load_dir), tag=checkpoint.folder.name)
        trainer.load_state_dict(checkpoint.meta["trainer"])
        loader.load_state_dict(load_data_states(checkpoint))
        if checkpoint.world_size == self.world.world_size:
            task: Task = engine.module
            task.load_sampler_state_dict(load_rank_state(checkpoint, self.world.rank)["samplers"])
        if self.world.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", checkpoint.step)
        # Last, right before training: everything above may draw random numbers.
        exact = restore_rng(checkpoint, self.world.rank, self.world.world_size, self.cfg.run.seed)
        how = "universal" if self.universal else "exact"
        rng = "restored" if exact else "re-seeded per rank"
        print0(f"resumed from {checkpoint.folder} at step {checkpoint.step} ({how} load, RNG {rng})")

    def save(
        self, engine: Any, trainer: Any, loader: Any, config_yaml: str, add_files: Callable[[Path], None] | None = None
    ) -> Path:
        """Every rank calls this. `add_files(staging_folder)`, when given, writes more files into the folder before
        the manifest is made, so the manifest covers them (the budget curve, `run.py`)."""
        meta = {
            "trainer": trainer.state_dict(),
            "config_hash": config_hash(self.cfg),
            "mtrain_version": __version__,
            "zero_stage": self.cfg.zero.stage,
            "saved_at": time.time(),
        }
        task: Task = engine.module
        rank_state = RankState(data=loader.state_dict(), samplers=task.sampler_state_dict())
        retention = Retention(self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
        lora = self.cfg.model.lora.enabled

        def write_extra(staging: Path) -> None:
            if lora:  # a collective: every rank joins the gather before any rank-0-only file work
                save_adapter_gathered(engine.module.model, staging / ADAPTER_DIR, self.world.is_main)
            if add_files is not None:
                add_files(staging)

        return save_checkpoint(
            engine, self.root, trainer.step, meta, rank_state, config_yaml, retention, write_extra=write_extra
        )


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint a run resumes from (they will be logged again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(f"{line}\n" for line in kept))
