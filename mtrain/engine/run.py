"""`mtrain train`: from a validated config to a finished run folder."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mtrain.checkpoint.checkpointer import Checkpointer
from mtrain.checkpoint.export import export_checkpoint
from mtrain.checkpoint.resume import preflight_resume
from mtrain.checkpoint.run_folder import check_fresh_start
from mtrain.checkpoint.save import inject_fault
from mtrain.config import TrainConfig, config_hash, dump_yaml
from mtrain.config.core import to_dict
from mtrain.config.deepspeed_json import deepspeed_config
from mtrain.engine.setup import initialize_engine, resolve_placement
from mtrain.engine.trainer import Trainer
from mtrain.eval.curves import budget_curve, write_curve
from mtrain.eval.in_loop import InLoopEval
from mtrain.launch.distributed import init_distributed, print0, run_on_main
from mtrain.launch.env import WorldInfo
from mtrain.launch.inputs import check_inputs
from mtrain.launch.model_checks import check_model
from mtrain.launch.preflight import check_parameters_identical, check_ranks_agree, collective_device
from mtrain.launch.timing import record_first_step
from mtrain.metrics.sinks import JsonlSink, MetricSink, NullSink, SinkGroup, TensorBoardSink, WandbSink
from mtrain.model.build import build_model, parameter_elements
from mtrain.task.registry import Objective, objective_for


def check_inputs_exist(cfg: TrainConfig) -> None:
    """Fail before any process group forms when local shards, the model folder or the resume point are wrong."""
    check_inputs(cfg)
    check_model(cfg)  # the folder's family, scales and pad token: before any process group forms
    check_fresh_start(Path(cfg.run.dir), cfg.checkpoint.resume, cfg.checkpoint.start_over)
    preflight_resume(cfg)  # a missing checkpoint or an incompatible config change fails here


def prepare_run_dir(cfg: TrainConfig, ds_config: dict[str, Any], world: WorldInfo) -> Path:
    run_dir = Path(cfg.run.dir)
    if world.is_main:
        if cfg.checkpoint.start_over:
            from mtrain.checkpoint.run_folder import archive_previous_run  # noqa: PLC0415

            archive = archive_previous_run(run_dir)
            if archive is not None:
                print0(f"start_over: the previous run in {run_dir} was moved to {archive}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        (run_dir / "ranks").mkdir(exist_ok=True)
    if world.world_size > 1:
        dist.barrier()
    return run_dir


def write_rank_report(
    run_dir: Path, world: WorldInfo, cfg: TrainConfig, constructed: dict[str, int], engine: dict[str, int]
) -> None:
    """Per-rank facts for humans and tests: where the rank sits, and how much of the model it holds."""
    report = {
        "rank": world.rank,
        "world_size": world.world_size,
        "launcher": world.launcher,
        "config_hash": config_hash(cfg),
        "parameter_elements": {"constructed": constructed, "engine": engine},
    }
    (run_dir / "ranks" / f"rank{world.rank:05d}.json").write_text(json.dumps(report))


def make_sink(cfg: TrainConfig, run_dir: Path, world: WorldInfo, resumed_step: int = 0) -> MetricSink:
    if not world.is_main:
        return NullSink()
    sinks: list[MetricSink] = [JsonlSink(run_dir / "metrics.jsonl")]
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard", purge_step=resumed_step + 1 if resumed_step else None))
    if cfg.logging.wandb:
        log = cfg.logging
        sinks.append(WandbSink(run_dir, log.wandb_project, cfg.run.name, log.wandb_mode, to_dict(cfg)))
    return SinkGroup(sinks)


@dataclass
class Run:
    """Everything a started run holds between setup, the training loop and the finish."""

    cfg: TrainConfig
    world: WorldInfo
    run_dir: Path
    objective: Objective
    checkpointer: Checkpointer
    engine: Any
    trainer: Trainer
    batches: Any
    started: float
    resumed_step: int
    evaluation: InLoopEval | None = None
    last_evaluation: tuple[int, dict[str, float]] | None = None
    """The step and metrics of the latest evaluation: the checkpoint of that step holds its budget curve."""

    def save(self) -> None:
        self.trainer.check_finite()  # no checkpoint holds the weights of a non-finite step
        self.checkpointer.save(self.engine, self.trainer, self.batches, dump_yaml(self.cfg), self.curve_writer())

    def curve_writer(self) -> Callable[[Path], None] | None:
        """Rank 0's writer of this step's budget curve (JSON + PNG) into the staged checkpoint folder, where the
        manifest covers it; None on other ranks and at a step that was not evaluated."""
        if not self.world.is_main or self.last_evaluation is None or self.last_evaluation[0] != self.trainer.step:
            return None
        curve = budget_curve(*self.last_evaluation)
        if curve is None:
            return None

        def write(staging: Path) -> None:
            write_curve(curve, staging)

        return write

    def due_for_save(self, step: int) -> bool:
        """A periodic save: every `checkpoint.save_every` steps, the last step left to the finish."""
        every = self.cfg.checkpoint.save_every
        return bool(every) and step % every == 0 and step < self.cfg.run.max_steps

    def saves_at(self, step: int) -> bool:
        """A checkpoint is saved after `step`: a periodic save, or the final one."""
        final = step == self.cfg.run.max_steps and self.cfg.checkpoint.save_at_end
        return self.due_for_save(step) or final

    def end_of_step(self, trainer: Trainer) -> None:
        """After every step: the first step's timing once, the evaluation and the periodic save.

        The evaluation comes first: a checkpoint of step N then follows step N's eval line, so a
        resume from it logs no eval twice and misses none. With evaluation on, a step that saves a
        checkpoint is evaluated too when `eval.every` / `eval.at_end` did not ask for it: every
        checkpoint then holds its budget curve."""
        if trainer.step == self.resumed_step + 1:
            report_first_step(self)
        if self.evaluation is not None and (self.evaluation.due(trainer.step) or self.saves_at(trainer.step)):
            evaluate(self)
        if self.due_for_save(trainer.step):
            self.save()


def run_training(cfg: TrainConfig) -> list[dict[str, float]]:
    """Train as configured; every rank of the job calls this."""
    run = set_up(cfg)
    history = train(run)
    finish(run, history)
    return history


def set_up(cfg: TrainConfig) -> Run:
    """From the config to a restored trainer: process group, run folder, model, engine, data, checkpoint."""
    check_inputs_exist(cfg)
    started = time.time()
    placement = resolve_placement(cfg)
    world = init_distributed(
        placement.backend,
        cfg.dist.init_timeout_s,
        cfg.dist.master_port,
        collective_timeout_s=cfg.dist.collective_timeout_s,
        device=placement.device,
    )
    check_ranks_agree(world, config_hash(cfg), collective_device(placement.device, world))
    ds_config_base = deepspeed_config(cfg, world.world_size, placement.precision)
    run_dir = prepare_run_dir(cfg, ds_config_base, world)
    print0(
        f"mtrain: {world.world_size} rank(s) via {world.launcher}, {placement.device}/{placement.precision}, "
        f"ZeRO-{cfg.zero.stage}, run folder {run_dir}"
    )
    checkpointer = Checkpointer(cfg, run_dir, world)
    # Before the engine: a world-size change switches on the universal load.
    ds_config = checkpointer.prepare_resume(ds_config_base)
    objective = objective_for(cfg)
    zero3 = ds_config if cfg.zero.stage == 3 else None
    built = build_model(checkpointer.model_config(), placement.dtype, zero3, cfg.run.seed, cfg.matryoshka.tokens)
    checkpointer.load_init_adapters(built.model)
    engine = initialize_engine(cfg, built, ds_config, world.rank)
    report_model(cfg, world, run_dir, built, engine, placement.device)

    batches = objective.build_batches(cfg, built, world)
    trainer = Trainer(cfg, world, engine, batches, NullSink(), placement.device)
    checkpointer.restore(engine, trainer, batches)
    if engine.lr_scheduler.change_note:  # a resume with another schedule joins it without a jump (schedule.py)
        print0(engine.lr_scheduler.change_note)
    if trainer.step >= cfg.run.max_steps:
        print0(
            f"the run in {run_dir} already reached run.max_steps={cfg.run.max_steps}; raise it to continue, "
            "or train again from scratch with checkpoint.resume=never checkpoint.start_over=true (or another run.dir)"
        )
    # After restore, which trims metrics logged past the checkpoint; TensorBoard purges them too.
    trainer.sink = make_sink(cfg, run_dir, world, trainer.step)
    evaluation = InLoopEval.for_run(cfg, world, built, engine.module)
    return Run(
        cfg, world, run_dir, objective, checkpointer, engine, trainer, batches, started, trainer.step, evaluation
    )


def report_model(cfg: TrainConfig, world: WorldInfo, run_dir: Path, built: Any, engine: Any, device: str) -> None:
    """Preflight: parameters identical on every rank; then the rank report and a line about the model."""
    by_value, by_layout = check_parameters_identical(engine.module, collective_device(device, world))
    print0(f"preflight: ranks agree; parameters identical ({by_value} by value, {by_layout} ZeRO-3 by layout)")
    elements = parameter_elements(engine.module)
    write_rank_report(run_dir, world, cfg, built.constructed_elements, elements)
    print0(
        f"model {built.source}: {elements['total']:,} parameters, {elements['trainable']:,} trainable, "
        f"{elements['local']:,} held by rank 0; {built.visual_tokens} visual tokens per image"
    )


def train(run: Run) -> list[dict[str, float]]:
    """The trainer's loop; after each step, `Run.end_of_step` saves on the configured cadence."""
    history = run.trainer.train(on_step_end=run.end_of_step)
    run.trainer.sink.close()
    return history


def evaluate(run: Run) -> dict[str, float]:
    """The held-out evaluation on every rank (the engine's own weights), logged beside the step's metrics."""
    assert run.evaluation is not None
    started = time.perf_counter()
    metrics = run.evaluation.evaluate(run.trainer.to_device, run.trainer.device)
    run.trainer.sink.log(run.trainer.step, metrics)
    run.last_evaluation = (run.trainer.step, metrics)
    losses = ", ".join(f"{name.split('/')[-1]} {value:.4f}" for name, value in metrics.items() if "/loss/" in name)
    print0(f"eval at step {run.trainer.step} ({time.perf_counter() - started:.1f}s): {losses or metrics}")
    return metrics


def report_first_step(run: Run) -> None:
    """Time from launch to the first step, per launcher."""
    timing = record_first_step(run.run_dir, run.world, run.trainer.step)
    since = "" if timing["first_step_s"] is None else f"{timing['first_step_s']} s after launch, "
    print0(f"first step (step {run.trainer.step}): {since}{timing['process_to_first_step_s']} s after process start")


def finish(run: Run, history: list[dict[str, float]]) -> None:
    """The final checkpoint and export, a summary line, then leave together."""
    cfg, world, trainer = run.cfg, run.world, run.trainer
    if cfg.checkpoint.save_at_end and trainer.step > run.resumed_step:
        run.save()
        print0(f"checkpoint: {run.run_dir / 'checkpoints'} (step {trainer.step})")
    already_exported = trainer.step == run.resumed_step and (run.run_dir / "export").exists()  # a finished run re-run
    if cfg.checkpoint.save_at_end and cfg.checkpoint.export_at_end and already_exported:
        print0(f"export: {run.run_dir / 'export'} already holds step {trainer.step} (`mtrain export` writes another)")
    elif cfg.checkpoint.save_at_end and cfg.checkpoint.export_at_end:
        export(run)
    if history:
        print0(
            f"done: {trainer.step} steps in {time.time() - run.started:.0f}s, "
            f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}"
        )
    # Leave together, then tear down in order: a rank that closes its gloo pairs while its peer's
    # engine still holds in-flight ZeRO-3 work can make the peer abort at exit.
    if world.world_size > 1:
        dist.barrier()
    run.engine.destroy()
    dist.destroy_process_group()


def export(run: Run) -> None:
    """The objective's extras (every rank joins their ZeRO-3 gathers), then the Hugging Face export on rank 0."""
    export_dir = run.run_dir / "export"
    run.objective.export_extras(run.engine.module, export_dir, run.world.is_main)

    def export_on_main() -> str:
        inject_fault("export", run.trainer.step)
        return str(export_checkpoint(run.run_dir / "checkpoints", export_dir))

    # Minutes for a 7B model: the other ranks wait outside any collective (see run_on_main).
    out = run_on_main(export_on_main, "export")
    print0(f"export: {out}/model (Hugging Face), adapter: {run.cfg.model.lora.enabled}")
