"""`mtrain eval` orchestration: load, stream held-out batches, score every scale, report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mtrain.eval.budget import format_table, write_report
from mtrain.task.registry import budget_view


def eval_batches(cfg: Any, built: Any, shards: str | None, num_batches: int = 0, form: Any = None) -> Any:
    """One pass over the held-out batches in a single process, in shard order (no shuffling): the whole set,
    or its first `num_batches`; the loader of the in-loop evaluation (`form` as in build_data_loader)."""
    from mtrain.eval.held_out import held_out_loader, one_pass  # noqa: PLC0415
    from mtrain.launch.env import WorldInfo  # noqa: PLC0415

    single = WorldInfo(0, 1, 0, 1, "127.0.0.1", 0, "none")
    return one_pass(held_out_loader(cfg, built, single, shards, form), num_batches)


def trained_scales(cfg: Any, built: Any) -> list[int]:
    """The visual-token budgets a model was trained at: its scales, or the full grid without any."""
    tokens = cfg.matryoshka.tokens
    return list(tokens.scales) if tokens.mode != "none" else [built.visual_tokens]


def check_budgets_trained(scales: list[int], trained: list[int], allow_untrained: bool) -> None:
    """Refuse budgets the model never trained at unless asked for explicitly (their figures are then marked)."""
    untrained = [s for s in scales if s not in trained]
    if untrained and not allow_untrained:
        raise ValueError(
            f"--scales {untrained}: this model was trained only at {trained} visual tokens; add --untrained-budgets "
            "to evaluate there anyway (the table and budget.json mark those budgets)"
        )


def eval_world(cfg: Any, placement: Any) -> Any:
    """This process's place in the job: one process, or a rank of any launcher (the process group joined with
    the backend of the placement: nccl on GPUs, gloo on the CPU)."""
    from mtrain.launch.env import world_info_from_env  # noqa: PLC0415

    world = world_info_from_env()
    if world.world_size == 1:
        return world
    from mtrain.launch.distributed import init_distributed  # noqa: PLC0415

    return init_distributed(placement.backend, cfg.dist.init_timeout_s, world.master_port, device=placement.device)


def eval_model(cfg: Any, checkpoint: Any, world: Any, placement: Any) -> tuple[Any, Any]:
    """(built model, task) as training holds them: on several ranks with ZeRO-3, partitioned over the ranks (each
    holds 1/N of the weights, gathered per module as training gathers them); otherwise whole on this rank.
    Either way in the training precision (`run.precision`: bf16 on a GPU, fp32 on the CPU by default)."""
    from mtrain.eval.budget import whole_task  # noqa: PLC0415

    if world.world_size > 1 and cfg.zero.stage == 3:
        return sharded_task(cfg, checkpoint, world, placement)
    return whole_task(cfg, checkpoint, placement.dtype, placement.device)


def sharded_task(cfg: Any, checkpoint: Any, world: Any, placement: Any) -> tuple[Any, Any]:
    """The task under a ZeRO-3 engine without an optimizer (DeepSpeed then installs only its parameter gathering),
    the checkpoint's weights written into each rank's partitions."""
    import deepspeed  # noqa: PLC0415

    from mtrain.config.deepspeed_json import deepspeed_config  # noqa: PLC0415
    from mtrain.model.build import build_model  # noqa: PLC0415
    from mtrain.task.registry import build_task  # noqa: PLC0415

    ds_config = deepspeed_config(cfg, world.world_size, placement.precision)
    built = build_model(cfg.model, placement.dtype, ds_config, cfg.run.seed, cfg.matryoshka.tokens)
    engine, _, _, _ = deepspeed.initialize(model=build_task(cfg, built, world.rank), config=ds_config)
    if checkpoint:
        load_into_partitions(engine.module, checkpoint, world)
    return built, engine.module.eval()


def load_into_partitions(task: Any, checkpoint: Any, world: Any) -> None:
    """Rank 0 reads the consolidated weights and writes them into the ZeRO-3 partitions one parameter at a time:
    no rank's device ever holds more than its partition and one gathered parameter."""
    import deepspeed  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from mtrain.eval.budget import consolidated_weights  # noqa: PLC0415

    names = [name for name, _ in task.named_parameters()]
    state = consolidated_weights(checkpoint) if world.is_main else {}
    missing = [sorted(set(names) - set(state))[:4] if world.is_main else None]
    dist.broadcast_object_list(missing, src=0)  # every rank raises, or none does (no rank left in a gather)
    if missing[0]:
        raise ValueError(f"the checkpoint {checkpoint[0] / checkpoint[1]} lacks weights of this model: {missing[0]}")
    for name, param in task.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if world.is_main:
                param.data.copy_(state[name])


def evaluate_on_ranks(
    cfg: Any, built: Any, view: Any, world: Any, shards: str | None, num_batches: int, device: str = "cpu"
) -> list:
    """Every rank scores its share of the held-out set (lockstep rounds, a progress bar on rank 0); the sums
    are reduced over ranks, as the in-loop evaluation reduces them, so any number of ranks gives the same table."""
    import torch  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from mtrain.engine.trainer import batch_to_device  # noqa: PLC0415
    from mtrain.eval.budget import evaluate_token_budgets, reduce_sums, scale_results  # noqa: PLC0415
    from mtrain.eval.held_out import held_out_loader, lockstep, one_pass, sum_over_ranks  # noqa: PLC0415

    all_reduce = sum_over_ranks(world, device)
    batches = one_pass(held_out_loader(cfg, built, world, shards), num_batches)
    rounds = tqdm(lockstep(batches, all_reduce, world.world_size), desc="eval", unit="batch",
                  disable=not world.is_main, file=sys.stderr)  # fmt: skip
    dtype = view.input_dtype

    def to_device(batch: dict[str, Any]) -> dict[str, Any]:
        return batch_to_device(batch, device, dtype)

    with torch.no_grad():
        sums = evaluate_token_budgets(view, rounds, to_device=to_device)
    results = scale_results(reduce_sums(sums, all_reduce))
    if cfg.eval.generate_samples:
        add_generated_accuracy(results, cfg, built, view, world, shards, all_reduce, to_device)
    return results


def add_generated_accuracy(results: list, cfg: Any, built: Any, view: Any, world: Any, shards: str | None,
                           all_reduce: Any, to_device: Any) -> None:  # fmt: skip
    """Each row's generated-answer accuracy over the first `eval.generate_samples` held-out samples (the
    in-loop evaluation's code path: `mtrain.eval.generation`)."""
    import torch  # noqa: PLC0415

    from mtrain.eval.generation import generated_accuracy, generated_answer_sums, generation_model  # noqa: PLC0415

    with torch.no_grad():
        model = generation_model(cfg, view, built.scale_routing)
        sums = generated_answer_sums(cfg, built, model, world, shards, view.tokens.scales, to_device, all_reduce)
    per_scale = generated_accuracy(sums)
    for result in results:
        result.generated_accuracy, result.generated_answers = per_scale[result.scale]


def placement_line(world: Any, placement: Any, task: Any, zero_stage: int) -> str:
    """Where `mtrain eval` runs and how much of the model each rank holds."""
    from mtrain.model.build import parameter_elements  # noqa: PLC0415

    elements = parameter_elements(task)
    sharded = f"ZeRO-{zero_stage}, " if world.world_size > 1 and zero_stage == 3 else ""
    return (
        f"mtrain eval: {world.world_size} rank(s), {placement.device}/{placement.precision}, {sharded}"
        f"rank {world.rank} holds {elements['local']:,} of {elements['total']:,} parameter elements"
    )


def run_eval(
    source: str,
    overrides: list[str],
    shards: str | None,
    num_batches: int,
    scales: list[int] | None,
    out: str,
    allow_untrained: bool = False,
) -> list:
    """`mtrain eval`: in one process, or on every rank of any launcher (ZeRO-3 partitions the weights over the
    ranks as in training; each rank scores its share; rank 0 prints the table and writes the report). Device and
    precision are the training run's (`run.device`, `run.precision`): bf16 on a GPU, fp32 on the CPU by default."""
    from mtrain.engine.setup import resolve_placement  # noqa: PLC0415
    from mtrain.eval.budget import eval_source  # noqa: PLC0415

    if shards:  # before the model loads: a typo here should not cost a model load
        from mtrain.launch.inputs import check_shards_exist  # noqa: PLC0415

        check_shards_exist(shards, "--shards")
    cfg, checkpoint = eval_source(source, overrides, shards)
    placement = resolve_placement(cfg)
    world = eval_world(cfg, placement)
    built, task = eval_model(cfg, checkpoint, world, placement)
    if world.is_main:
        print(placement_line(world, placement, task, cfg.zero.stage), file=sys.stderr)
    trained = trained_scales(cfg, built)
    check_budgets_trained(scales or trained, trained, allow_untrained)
    view = budget_view(cfg, built, task, scales or (trained if cfg.matryoshka.tokens.mode == "none" else None))
    results = evaluate_on_ranks(cfg, built, view, world, shards, num_batches, placement.device)
    for result in results:
        result.trained = result.scale in trained
    if world.world_size > 1:
        import torch.distributed as dist  # noqa: PLC0415

        dist.barrier()
        dist.destroy_process_group()
    if not world.is_main:
        return results
    print(format_table(results))
    if not all(r.trained for r in results):
        print("trained=no: a budget this model never trained at (--untrained-budgets)")
    json_path, png_path = write_report(results, Path(out), name=str(source))
    print(f"wrote {json_path} and {png_path}")
    return results
