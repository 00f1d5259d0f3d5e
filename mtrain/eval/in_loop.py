"""Evaluation inside the training job: held-out quality per budget, on every rank, with the engine's weights.

    eval.shards ──► this rank's share, one pass, in order (its own loader: the training data
                    position is untouched) ──► lockstep rounds (every rank runs the same forwards;
                    a rank out of batches repeats its last one, uncounted) ──► per budget sums
                    ──► one all-reduce of the sums (counts exact) ──► eval/<metric>/scale_<s>

The model is the training engine's own module: under ZeRO-3 each forward gathers the parameters
as training does, and nothing is copied or gathered to one rank. The RNG state is restored after
each evaluation, so a run with evaluation resumes bit-exactly. `mtrain eval` (`run.py`) runs the same
loader, rounds and sums (`held_out.py`, `budget.evaluate_token_budgets`) on any number of ranks, so
their figures agree. With `eval.generate_samples`, the first N held-out samples are also answered by
greedy generation at every scale (`generation.py`), every rank stepping together under ZeRO-3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mtrain.config.schema import TrainConfig
from mtrain.eval.budget import evaluate_token_budgets, reduce_sums, scale_results
from mtrain.eval.generation import generated_answer_sums, generated_metrics, generation_model
from mtrain.eval.held_out import held_out_loader, lockstep, one_pass, sum_over_ranks
from mtrain.launch.env import WorldInfo
from mtrain.task.registry import budget_view, objective_for


@contextlib.contextmanager
def modes_kept(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule's train/eval mode as it was before the block, whatever the block switched."""
    modes = [(child, child.training) for child in module.modules()]
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training


@contextlib.contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[None]:
    """No dropout, no graph; afterwards the RNG and every train mode as they were (training is not disturbed)."""
    from mtrain.checkpoint.save import rng_state, set_rng_state  # noqa: PLC0415

    saved = rng_state()
    try:
        with modes_kept(module), torch.no_grad():
            module.eval()
            yield
    finally:
        set_rng_state(saved)


def token_metrics(sums: dict[int, torch.Tensor]) -> dict[str, float]:
    """Loss, token accuracy and (teacher-forced) answer accuracy per scale, from sums over every rank."""
    out: dict[str, float] = {}
    for result in scale_results(sums):  # the divisions `mtrain eval` makes
        budget = f"scale_{result.scale}"
        out[f"eval/loss/{budget}"] = result.loss
        out[f"eval/token_accuracy/{budget}"] = result.token_accuracy
        out[f"eval/answer_accuracy/{budget}"] = result.answer_accuracy
        out[f"eval/tokens/{budget}"] = float(result.tokens)
        out[f"eval/answers/{budget}"] = float(result.answers)
    return out


def evaluate_retrieval_budgets(
    view: Any,
    rounds: Iterator[tuple[dict[str, Any], bool]],
    to_device: Callable[[dict[str, Any]], dict[str, Any]],
    layers: list[int],
    gather: Callable[[Any], list[Any]] | None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(layers, N, width) query and positive embeddings and positive texts of every rank's held-out pairs.

    Each rank embeds its share; `gather` (an all-gather of objects) joins them in rank order, so
    recall is scored against the whole held-out gallery, as `mtrain eval` scores it in one process."""
    queries, positives, texts = [], [], []
    for batch, counted in rounds:
        q, p = view.encode_pairs(to_device(batch), layers)
        if counted:
            queries.append(q.float().cpu())
            positives.append(p.float().cpu())
            texts += batch["positive_texts"]
    local = (torch.cat(queries, dim=1), torch.cat(positives, dim=1), texts)
    shares = gather(local) if gather is not None else [local]
    return (
        torch.cat([s[0] for s in shares], dim=1),
        torch.cat([s[1] for s in shares], dim=1),
        [text for s in shares for text in s[2]],
    )


def retrieval_metrics(results: list[Any], layered: bool) -> dict[str, float]:
    """Recall@1/5 per dim (and per layer when more than one layer is evaluated)."""
    out: dict[str, float] = {}
    for r in results:
        budget = f"layer_{r.layer}/dim_{r.dim}" if layered else f"dim_{r.dim}"
        out[f"eval/recall_at_1/{budget}"] = r.recall_at_1
        out[f"eval/recall_at_5/{budget}"] = r.recall_at_5
        out[f"eval/queries/{budget}"] = float(r.queries)
    return out


@dataclass
class InLoopEval:
    """The `eval:` block at work in a training job: when to evaluate, and the evaluation itself."""

    cfg: TrainConfig
    world: WorldInfo
    built: Any
    module: torch.nn.Module
    """The engine's task: its train mode is switched off and back around each evaluation."""
    view: Any
    """The task the budgets are read through: `module` itself, or a view over the same model."""
    contrastive: bool

    @classmethod
    def for_run(cls, cfg: TrainConfig, world: WorldInfo, built: Any, task: Any) -> InLoopEval | None:
        """The evaluation of this run, over the engine's task `task`; None when `eval.shards` is empty."""
        if not cfg.eval.enabled:
            return None
        if objective_for(cfg).held_out_metrics == "retrieval":
            return cls(cfg, world, built, task, task, contrastive=True)
        scales = cfg.eval.scales or None
        if scales is None and cfg.matryoshka.tokens.mode == "none":
            scales = [built.visual_tokens]  # trained at the full grid only: its one budget
        with modes_kept(task):  # a view is built in eval mode, and it shares the training model's modules
            view = budget_view(cfg, built, task, scales)
        return cls(cfg, world, built, task, view, contrastive=False)

    def due(self, step: int) -> bool:
        """Every `eval.every` steps, and after the last one when `eval.at_end`."""
        every, last = self.cfg.eval.every, self.cfg.run.max_steps
        return bool(every and step % every == 0) or (self.cfg.eval.at_end and step == last)

    def evaluate(self, to_device: Callable[[dict[str, Any]], dict[str, Any]], device: str) -> dict[str, float]:
        """One evaluation over the held-out shards; every rank calls it and gets the same metrics."""

        all_reduce = sum_over_ranks(self.world, device)
        form = self.pair_form() if self.contrastive else None
        loader = held_out_loader(self.cfg, self.built, self.world, self.cfg.eval.shards, form)
        rounds = lockstep(one_pass(loader, self.cfg.eval.batches), all_reduce, self.world.world_size)
        with evaluation_mode(self.module):
            if self.contrastive:
                return self.evaluate_retrieval(rounds, to_device)
            sums = evaluate_token_budgets(self.view, rounds, to_device)
            generated = self.generated_answers(to_device, all_reduce) if self.cfg.eval.generate_samples else {}
        return token_metrics(reduce_sums(sums, all_reduce)) | generated_metrics(generated)

    def generated_answers(self, to_device: Callable, all_reduce: Callable) -> dict[int, torch.Tensor]:
        """Greedy answers at every evaluated scale, with the engine's weights (`generation.py`)."""
        model = generation_model(self.cfg, self.module, self.built.scale_routing)
        return generated_answer_sums(self.cfg, self.built, model, self.world, self.cfg.eval.shards,
                                     self.view.tokens.scales, to_device, all_reduce)  # fmt: skip

    def pair_form(self) -> Any:
        from data_pipeline.pairs import PairForm  # noqa: PLC0415
        from mtrain.engine.data import pair_spec  # noqa: PLC0415

        return PairForm(pair_spec(self.cfg, self.built))

    def evaluate_retrieval(self, rounds: Iterator[tuple[Any, bool]], to_device: Callable) -> dict[str, float]:
        from data_pipeline.loader import torch_distributed_gather  # noqa: PLC0415
        from mtrain.eval.retrieval import score_retrieval  # noqa: PLC0415

        layers = self.cfg.eval.layers or self.view.evaluated_layers()
        gather = torch_distributed_gather() if self.world.world_size > 1 else None
        queries, positives, texts = evaluate_retrieval_budgets(self.view, rounds, to_device, layers, gather)
        dims = self.cfg.eval.dims or self.view.dims
        results = score_retrieval(queries, positives, texts, layers, dims, self.view.dims_config.resolved_scoring)
        return retrieval_metrics(results, layered=len(layers) > 1)
