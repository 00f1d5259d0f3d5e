"""`mtrain train`: from a validated config to a finished run folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mtrain.config import TrainConfig, config_hash, dump_yaml
from mtrain.config.core import to_dict
from mtrain.config.deepspeed_json import deepspeed_config
from mtrain.launch.distributed import init_distributed, print0
from mtrain.launch.env import WorldInfo
from mtrain.launch.preflight import check_parameters_identical, check_ranks_agree, collective_device
from mtrain.launch.timing import record_first_step
from mtrain.metrics.sinks import JsonlSink, MetricSink, NullSink, SinkGroup, TensorBoardSink, WandbSink


def check_inputs_exist(cfg: TrainConfig) -> None:
    """Fail before any process group forms when local shards, the model folder or the resume point are wrong."""
    from mtrain.checkpoint.resume import preflight_resume  # noqa: PLC0415
    from mtrain.checkpoint.run_folder import check_fresh_start  # noqa: PLC0415
    from mtrain.launch.inputs import check_inputs  # noqa: PLC0415

    check_inputs(cfg)
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


def pair_spec(cfg: TrainConfig, built: Any) -> Any:
    """How pair sides become tokens and pixels for this config and model."""
    from data_pipeline.pairs import PairSpec  # noqa: PLC0415

    return PairSpec(
        built.tokenizer,
        built.image_token_id,
        built.visual_tokens,
        cfg.data.max_len,
        built.model.config.vision_config.image_size,
        cfg.task.contrastive.query_instruction,
    )


def training_batches(cfg: TrainConfig, built: Any, world: WorldInfo) -> Any:
    """The staged loader for the LM objective; (query, positive) pair batches for the contrastive one."""
    if cfg.task.objective != "contrastive":
        from mtrain.engine.data import build_data_loader  # noqa: PLC0415

        return build_data_loader(cfg, built, world)
    from data_pipeline.pairs import PairStream  # noqa: PLC0415
    from data_pipeline.replay_stream import ResumableLoader  # noqa: PLC0415

    stream = PairStream(
        cfg.data.shards, world.rank, world.world_size, cfg.data.micro_batch_size, pair_spec(cfg, built),
        built.image_processor, cfg.run.seed, 0, cfg.data.num_workers,
    )  # fmt: skip
    return ResumableLoader(stream, cfg.data.num_workers)


def run_training(cfg: TrainConfig) -> list[dict[str, float]]:
    """Train as configured; every rank of the job calls this."""
    from mtrain.checkpoint.checkpointer import Checkpointer  # noqa: PLC0415
    from mtrain.checkpoint.export import export_checkpoint  # noqa: PLC0415
    from mtrain.embed import save_embedding_head  # noqa: PLC0415
    from mtrain.engine.setup import initialize_engine, resolve_placement  # noqa: PLC0415
    from mtrain.engine.trainer import Trainer  # noqa: PLC0415
    from mtrain.model.build import build_model, parameter_elements  # noqa: PLC0415

    check_inputs_exist(cfg)
    started = time.time()
    placement = resolve_placement(cfg)
    world = init_distributed(placement.backend, cfg.dist.init_timeout_s, cfg.dist.master_port)
    check_ranks_agree(world, config_hash(cfg), collective_device(placement.device, world))
    ds_config = deepspeed_config(cfg, world.world_size, placement.precision)
    run_dir = prepare_run_dir(cfg, ds_config, world)
    print0(
        f"mtrain: {world.world_size} rank(s) via {world.launcher}, {placement.device}/{placement.precision}, "
        f"ZeRO-{cfg.zero.stage}, run folder {run_dir}"
    )

    checkpointer = Checkpointer(cfg, run_dir, world)
    checkpointer.plan(ds_config)  # before the engine: a world-size change switches on the universal load

    zero3 = ds_config if cfg.zero.stage == 3 else None
    built = build_model(checkpointer.model_config(), placement.dtype, zero3, cfg.run.seed, cfg.matryoshka.tokens)
    engine = initialize_engine(cfg, built, ds_config, world.rank)
    by_value, by_layout = check_parameters_identical(engine.module, collective_device(placement.device, world))
    print0(f"preflight: ranks agree; parameters identical ({by_value} by value, {by_layout} ZeRO-3 by layout)")
    elements = parameter_elements(engine.module)
    write_rank_report(run_dir, world, cfg, built.constructed_elements, elements)
    print0(
        f"model {built.source}: {elements['total']:,} parameters, {elements['trainable']:,} trainable, "
        f"{elements['local']:,} held by rank 0; {built.visual_tokens} visual tokens per image"
    )

    batches = training_batches(cfg, built, world)
    trainer = Trainer(cfg, world, engine, batches, NullSink(), placement.device)
    checkpointer.restore(engine, trainer, batches)
    schedule_note = getattr(engine.lr_scheduler, "change_note", None)  # see engine/schedule.py
    if schedule_note:
        print0(schedule_note)
    resumed_step = trainer.step
    if resumed_step >= cfg.run.max_steps:
        print0(
            f"the run in {run_dir} already reached run.max_steps={cfg.run.max_steps}; raise it to continue, "
            "or train again from scratch with checkpoint.resume=never checkpoint.start_over=true (or another run.dir)"
        )
    trainer.sink = make_sink(
        cfg, run_dir, world, resumed_step
    )  # after restore, which trims metrics logged past the checkpoint
    config_yaml = dump_yaml(cfg)

    def save(t: Trainer) -> None:
        checkpointer.save(engine, t, batches, config_yaml)

    def maybe_save(t: Trainer) -> None:
        if cfg.checkpoint.save_every and t.step % cfg.checkpoint.save_every == 0 and t.step < cfg.run.max_steps:
            save(t)

    first_step_seen = False

    def on_step_end(t: Trainer) -> None:
        nonlocal first_step_seen
        if not first_step_seen:  # time from launch to the first step, per launcher
            first_step_seen = True
            timing = record_first_step(run_dir, world, t.step)
            since = "" if timing["first_step_s"] is None else f"{timing['first_step_s']} s after launch, "
            print0(f"first step (step {t.step}): {since}{timing['process_to_first_step_s']} s after process start")
        maybe_save(t)

    history = trainer.train(on_step_end=on_step_end)
    trainer.sink.close()
    if cfg.checkpoint.save_at_end and trainer.step > resumed_step:
        save(trainer)
        print0(f"checkpoint: {run_dir / 'checkpoints'} (step {trainer.step})")
    already_exported = trainer.step == resumed_step and (run_dir / "export").exists()  # a finished run re-run
    if cfg.checkpoint.save_at_end and cfg.checkpoint.export_at_end and already_exported:
        print0(f"export: {run_dir / 'export'} already holds step {trainer.step} (`mtrain export` writes another)")
    elif cfg.checkpoint.save_at_end:
        if cfg.checkpoint.export_at_end:
            if cfg.task.objective == "contrastive":
                # Every rank joins the gather of the head's ZeRO-3 partitions; rank 0 writes.
                save_embedding_head(engine.module, run_dir / "export", write=world.is_main)
            if world.is_main:
                out = export_checkpoint(run_dir / "checkpoints", run_dir / "export")
                print0(f"export: {out}/model (Hugging Face), adapter: {cfg.model.lora.enabled}")
            if world.world_size > 1:
                dist.barrier()
    if history:
        print0(
            f"done: {trainer.step} steps in {time.time() - started:.0f}s, "
            f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}"
        )
    # Leave together, then tear down in order: a rank that closes its gloo pairs while its peer's
    # engine still holds in-flight ZeRO-3 work can make the peer abort at exit.
    if world.world_size > 1:
        dist.barrier()
    engine.destroy()
    dist.destroy_process_group()
    return history
