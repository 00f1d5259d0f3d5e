"""`mtrain eval` orchestration: load, stream held-out batches, score every scale, report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mtrain.eval.budget import format_table, load_for_eval, write_report
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


def eval_world() -> Any:
    """This process's place in the job: one process, or a rank of any launcher (the process group joined)."""
    from mtrain.launch.env import world_info_from_env  # noqa: PLC0415

    world = world_info_from_env()
    if world.world_size == 1:
        return world
    from mtrain.launch.distributed import init_distributed  # noqa: PLC0415

    return init_distributed("gloo", 300, world.master_port)


def evaluate_on_ranks(cfg: Any, built: Any, view: Any, world: Any, shards: str | None, num_batches: int) -> list:
    """Every rank scores its share of the held-out set (lockstep rounds, a progress bar on rank 0); the sums
    are reduced over ranks, as the in-loop evaluation reduces them, so any number of ranks gives the same table."""
    import torch  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from mtrain.eval.budget import evaluate_token_budgets, reduce_sums, scale_results  # noqa: PLC0415
    from mtrain.eval.held_out import held_out_loader, lockstep, one_pass, sum_over_ranks  # noqa: PLC0415

    all_reduce = sum_over_ranks(world)  # `mtrain eval` runs on the CPU (gloo)
    batches = one_pass(held_out_loader(cfg, built, world, shards), num_batches)
    rounds = tqdm(lockstep(batches, all_reduce, world.world_size), desc="eval", unit="batch",
                  disable=not world.is_main, file=sys.stderr)  # fmt: skip
    with torch.no_grad():
        sums = evaluate_token_budgets(view, rounds, to_device=lambda batch: batch)
    results = scale_results(reduce_sums(sums, all_reduce))
    if cfg.eval.generate_samples:
        add_generated_accuracy(results, cfg, built, view, world, shards, all_reduce)
    return results


def add_generated_accuracy(results: list, cfg: Any, built: Any, view: Any, world: Any, shards: str | None,
                           all_reduce: Any) -> None:  # fmt: skip
    """Each row's generated-answer accuracy over the first `eval.generate_samples` held-out samples (the
    in-loop evaluation's code path: `mtrain.eval.generation`)."""
    import torch  # noqa: PLC0415

    from mtrain.eval.generation import generated_accuracy, generated_answer_sums, generation_model  # noqa: PLC0415

    with torch.no_grad():
        model = generation_model(cfg, view, built.scale_routing)
        sums = generated_answer_sums(cfg, built, model, world, shards, view.tokens.scales, lambda b: b, all_reduce)
    per_scale = generated_accuracy(sums)
    for result in results:
        result.generated_accuracy, result.generated_answers = per_scale[result.scale]


def run_eval(
    source: str,
    overrides: list[str],
    shards: str | None,
    num_batches: int,
    scales: list[int] | None,
    out: str,
    allow_untrained: bool = False,
) -> list:
    """`mtrain eval`: in one process, or on every rank of any launcher (each loads the weights and scores its
    share; rank 0 prints the table and writes the report)."""
    if shards:  # before the model loads: a typo here should not cost a model load
        from mtrain.launch.inputs import check_shards_exist  # noqa: PLC0415

        check_shards_exist(shards, "--shards")
    cfg, built, task = load_for_eval(source, overrides, shards)
    trained = trained_scales(cfg, built)
    check_budgets_trained(scales or trained, trained, allow_untrained)
    view = budget_view(cfg, built, task, scales or (trained if cfg.matryoshka.tokens.mode == "none" else None))
    world = eval_world()
    results = evaluate_on_ranks(cfg, built, view, world, shards, num_batches)
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
