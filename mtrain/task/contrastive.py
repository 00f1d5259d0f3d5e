"""Contrastive embedding training (VLM2Vec) with Matryoshka dims (MRL) and layers (2DMSE, Starbucks).

One step:

    queries + positives (+ hard negatives), one row each ─► vision tower + LM once, every hidden state kept
        ─► pool each layer the step uses ─► (layers, rows, width)
    gather every rank's embeddings (the local slice put back, so its gradient flows)
    loss = Σ_terms weight · InfoNCE(first k dims of layer l, re-normalised, temperature;
                                    candidates: every positive, then every hard negative)
         + kl_weight · Σ KL(last layer's similarity distribution ‖ shallow one's)

Which (layer, dim) terms a step has is a `StepPlan`, drawn from (seed, step) alone, so every rank
holds the same plan and runs the same modules (ZeRO-3 gathers in the same order everywhere).

Every rank computes the loss of the whole global batch, but its backward reaches only its own
slice; the sum of the ranks' gradients is then the global-batch gradient. DeepSpeed averages
over ranks, so the loss handed to backward is scaled by the world size (see `summarize`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data_pipeline.collate import ROW_IMAGES, ROW_TOKENS
from mtrain.config.schema import ContrastiveConfig, EmbeddingDimsConfig
from mtrain.model.embedding_head import EmbeddingHead, check_dims, truncate
from mtrain.task.base import Task
from mtrain.task.token_layout import row_counts

SIDES = ("query", "positive")
NEGATIVE = "negative"
NEGATIVE_ROWS = "negative_rows"  # host list: which samples have a row in `negative_*` (data_pipeline/pairs.py)


def sides_of(batch: dict[str, Any]) -> tuple[str, ...]:
    """The sides a batch holds; the pair loader always adds `negative_*` (maybe of zero rows), so
    every rank of a run takes the same path."""
    return (*SIDES, NEGATIVE) if f"{NEGATIVE}_input_ids" in batch else SIDES


@dataclass(frozen=True)
class Term:
    """One InfoNCE loss: embeddings of `layer` cut to `dim`, weighted."""

    layer: int
    dim: int
    weight: float


@dataclass(frozen=True)
class StepPlan:
    terms: tuple[Term, ...]
    kl_students: tuple[tuple[int, int], ...]  # (layer, dim) aligned to the last layer at the full dim
    last_layer: int
    full_dim: int

    @property
    def layers(self) -> list[int]:
        """Layers whose embeddings the step needs, increasing (a fixed order on every rank)."""
        used = {t.layer for t in self.terms} | {layer for layer, _ in self.kl_students}
        if self.kl_students:
            used.add(self.last_layer)
        return sorted(used)


def plan_step(dims: EmbeddingDimsConfig, depth: int, width: int, seed: int, step: int) -> StepPlan:
    """The (layer, dim) terms of `step`: a pure function of (config, seed, step), the same on every rank."""
    sizes = check_dims(dims.dims, width)
    weights = dims.weights or [1.0] * len(sizes)
    full = sizes[-1]
    if dims.policy == "mrl":
        return StepPlan(tuple(Term(depth, d, w) for d, w in zip(sizes, weights, strict=True)), (), depth, full)
    if dims.policy == "starbucks":
        pairs = list(zip(dims.layers, sizes, strict=True))
        terms = tuple(Term(layer, d, w) for (layer, d), w in zip(pairs, weights, strict=True))
        return StepPlan(terms, tuple(p for p in pairs if p != (depth, full)), depth, full)
    candidates = dims.layers or list(range(1, depth))
    draw = random.Random(f"2dmse/{seed}/{step}")  # seeded by (seed, step) only: never by rank
    layer, dim = draw.choice(candidates), draw.choice(sizes)
    terms = (Term(depth, full, 1.0), Term(layer, dim, 1.0))
    return StepPlan(terms, ((layer, full),), depth, full)


def gather_keep_local(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order, with this rank's slice the autograd-tracked tensor."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.detach().contiguous())
    parts[dist.get_rank()] = local  # all_gather returns tensors without a graph
    return torch.cat(parts, dim=-2)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def info_nce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    dim: int,
    temperature: float,
    negatives: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of query i against positive i, every other positive a negative, at size `dim`.

    `negatives` (hard negatives, any number of rows) are extra candidates for every query; rows
    whose `negative_mask` is false are left out (a sample without a negative holds a blank row)."""
    logits = truncate(queries, dim) @ truncate(positives, dim).T / temperature
    if negatives is not None:
        extra = truncate(queries, dim) @ truncate(negatives, dim).T / temperature
        if negative_mask is not None:
            extra = extra.masked_fill(~negative_mask, float("-inf"))  # exp(-inf) = 0: no candidate
        logits = torch.cat([logits, extra], dim=1)
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device))


def similarity_kl(
    teacher_q: torch.Tensor,
    teacher_p: torch.Tensor,
    student_q: torch.Tensor,
    student_p: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """KL(teacher ‖ student) of each query's distribution over the positives; the teacher is not trained by it."""
    teacher = F.log_softmax((teacher_q @ teacher_p.T / temperature).detach(), dim=-1)
    student = F.log_softmax(student_q @ student_p.T / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


class ContrastiveTask(Task):
    def __init__(
        self,
        model: nn.Module,
        contrastive: ContrastiveConfig,
        dims: EmbeddingDimsConfig,
        image_token_id: int,
        visual_tokens: int,
        pad_token_id: int,
        seed: int,
    ) -> None:
        super().__init__(model)
        text_config = self.llava.config.text_config
        self.head = EmbeddingHead(text_config.hidden_size, contrastive.pooling, contrastive.projection_dim)
        self.contrastive = contrastive
        self.dims_config = dims
        self.dims = check_dims(dims.dims, self.head.out_width)
        self.depth = text_config.num_hidden_layers
        if any(layer > self.depth for layer in dims.layers):
            raise ValueError(f"matryoshka.dims.layers={dims.layers} name layers beyond the model's {self.depth}")
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.visual_tokens = visual_tokens
        self.image_size = self.llava.config.vision_config.image_size
        self.seed = seed
        self.step = 0
        self.chunk_size = contrastive.chunk_size

    def begin_step(self, step: int) -> None:
        self.step = step

    def evaluated_layers(self) -> list[int]:
        """The last layer, plus every layer the 2D policies train (2dmse without a list: all of them)."""
        policy, layers = self.dims_config.policy, self.dims_config.layers
        if policy == "2dmse" and not layers:
            return list(range(1, self.depth + 1))
        return sorted({*layers, self.depth}) if policy != "mrl" else [self.depth]

    def plan(self) -> StepPlan:
        return plan_step(self.dims_config, self.depth, self.head.out_width, self.seed, self.step)

    # ── embedding ─────────────────────────────────────────────────────────────────────────────
    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, layers: list[int]
    ) -> torch.Tensor:
        """Pooled embeddings of every row at each of `layers`: (len(layers), rows, width).

        The vision tower runs on every call, on a blank image when the rows hold none, and the
        language model once with all hidden states: the module sequence never depends on the data.
        """
        embeddings = self.llava.get_input_embeddings()(input_ids)
        blank = pixel_values.shape[0] == 0
        images = pixel_values if not blank else embeddings.new_zeros(1, 3, self.image_size, self.image_size)
        output = self.llava.model.get_image_features(pixel_values=images.to(embeddings.dtype), return_dict=True)
        features = torch.cat(list(output.pooler_output)).to(embeddings.dtype)
        if blank:
            embeddings = embeddings + 0.0 * features.sum()  # keeps the vision path in every backward
        else:
            embeddings = embeddings.masked_scatter((input_ids == self.image_token_id).unsqueeze(-1), features)
        hidden_states = self.llava.model(
            inputs_embeds=embeddings, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        ).hidden_states
        return torch.stack([self.head(hidden_states[layer], attention_mask) for layer in layers])

    def encode_pairs(self, batch: dict[str, Any], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and positives embedded in one forward: (layers, rows, width) each."""
        queries, positives = self.encode_sides(batch, layers, SIDES)
        return queries, positives

    def encode_sides(self, batch: dict[str, Any], layers: list[int], sides: tuple[str, ...]) -> list[torch.Tensor]:
        """Every side's rows embedded in one forward: (layers, rows of the side, width) per side."""
        rows = [batch[f"{side}_input_ids"].shape[0] for side in sides]
        width = max(batch[f"{side}_input_ids"].shape[1] for side in sides)

        def right_padded(name: str) -> torch.Tensor:
            # Every side to one width; mask 0 marks the new columns, and the ids there are never read.
            return torch.cat([F.pad(batch[f"{s}_{name}"], (0, width - batch[f"{s}_{name}"].shape[1])) for s in sides])

        input_ids, mask = right_padded("input_ids"), right_padded("attention_mask")
        input_ids = torch.where(mask.bool(), input_ids, self.pad_token_id)  # so no padding id is taken for <image>
        pixel_values = torch.cat([batch[f"{side}_pixel_values"] for side in sides])
        embeddings = self.encode(input_ids, mask, pixel_values, layers)
        return list(embeddings.split(rows, dim=1))

    # ── the loss ──────────────────────────────────────────────────────────────────────────────
    def objective(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        plan: StepPlan,
        negatives: torch.Tensor | None = None,
        negative_rows: list[bool] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Global-batch loss from this rank's (layers, rows, width) embeddings, scaled by the world size.

        `negatives` holds the hard negatives of the samples marked in `negative_rows`, in order."""
        index = {layer: i for i, layer in enumerate(plan.layers)}
        queries, positives = gather_keep_local(queries), gather_keep_local(positives)
        negative_mask = None
        if negatives is not None:
            negatives, negative_mask = gathered_negatives(negatives, negative_rows or [])
        temperature = self.contrastive.temperature
        device = queries.device
        # Per-term losses stay on the device; the counts are known on the host.
        term_grid = torch.zeros(self.depth, len(self.dims), dtype=torch.float64, device=device)
        counts = [[0.0] * len(self.dims) for _ in range(self.depth)]
        loss = queries.new_zeros((), dtype=torch.float32)
        for term in plan.terms:
            layer = index[term.layer]
            term_loss = info_nce(
                queries[layer],
                positives[layer],
                term.dim,
                temperature,
                negatives[layer] if negatives is not None else None,
                negative_mask,
            )
            loss = loss + term.weight * term_loss
            cell = (term.layer - 1, self.dims.index(term.dim))
            term_grid[cell] += term_loss.detach().double()
            counts[cell[0]][cell[1]] += 1
        kl_total = loss.new_zeros(())
        kl_t = self.dims_config.kl_temperature
        last = index.get(plan.last_layer)
        for layer, dim in plan.kl_students:
            teacher = (truncate(queries[last], plan.full_dim), truncate(positives[last], plan.full_dim))
            student = (truncate(queries[index[layer]], dim), truncate(positives[index[layer]], dim))
            kl_total = kl_total + similarity_kl(*teacher, *student, kl_t)
        loss = loss + self.dims_config.kl_weight * kl_total
        drawn = plan.terms[-1] if self.dims_config.policy == "2dmse" else Term(0, 0, 0.0)
        metrics = {
            "contrastive_loss": loss.detach().double(),
            "kl_loss": kl_total.detach().double(),
            "term_loss": term_grid,
            "term_count": torch.tensor(counts, dtype=torch.float64, device=device),
            # Summed over ranks by the trainer: identical draws leave a zero spread (see summarize).
            "drawn_layer": torch.tensor(float(drawn.layer), device=device),
            "drawn_layer_sq": torch.tensor(float(drawn.layer) ** 2, device=device),
            "drawn_dim": torch.tensor(float(drawn.dim), device=device),
            "drawn_dim_sq": torch.tensor(float(drawn.dim) ** 2, device=device),
            "draws": torch.tensor(1.0, device=device),
        }
        return loss * world_size(), metrics

    # ── the two step paths ────────────────────────────────────────────────────────────────────
    def forward(self, batch: dict[str, Any], embed_layers: list[int] | None = None) -> Any:
        """The step's loss and metrics; with `embed_layers`, only the (queries, positives) embeddings."""
        if embed_layers is not None:
            return tuple(self.encode_sides(batch, embed_layers, sides_of(batch)))
        plan = self.plan()
        sides = sides_of(batch)
        embedded = self.encode_sides(batch, plan.layers, sides)
        loss, metrics = self.objective(*embedded[:2], plan, *negative_args(batch, embedded))
        metrics["tokens"] = sum(batch[f"{side}_attention_mask"].sum() for side in sides).detach()
        return loss, metrics

    def forward_backward(
        self,
        batch: dict[str, Any],
        forward: Callable[..., Any],
        backward: Callable[[torch.Tensor], Any],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GradCache: embed chunks without a graph, take the loss and its gradient with respect to
        the embeddings on the whole batch, then replay each chunk with a graph and backpropagate
        the cached gradient. Only one chunk's activations are alive at a time.

        `forward` is the DeepSpeed engine (or the task) and `backward` the engine's backward, so
        ZeRO-3 gathers and reduces exactly as on the direct path; every rank has the same chunks.
        Without `task.contrastive.chunk_size`, the direct step.
        """
        if not self.chunk_size:
            return super().forward_backward(batch, forward, backward)
        plan = self.plan()
        chunks = chunk_bounds(batch["query_input_ids"].shape[0], self.chunk_size)
        rng_states, embedded = [], []
        with torch.no_grad():
            for start, end in chunks:
                rng_states.append(random_state())  # replayed below, so dropout masks match
                embedded.append(forward(slice_pairs(batch, start, end, self), embed_layers=plan.layers))
        # Per side, every chunk's rows in order: the whole batch's embeddings, without a graph.
        whole = [torch.cat(parts, dim=1).requires_grad_() for parts in zip(*embedded, strict=True)]
        loss, metrics = self.objective(*whole[:2], plan, *negative_args(batch, whole))
        grads = torch.autograd.grad(loss, whole)
        firsts = [0] * len(whole)  # where each side's rows of the next chunk start
        for (start, end), state in zip(chunks, rng_states, strict=True):
            with restored_random_state(state):
                chunk = forward(slice_pairs(batch, start, end, self), embed_layers=plan.layers)
            surrogate = sum(
                (part * grad[:, first : first + part.shape[1]]).sum()
                for part, grad, first in zip(chunk, grads, firsts, strict=True)
            )
            firsts = [first + part.shape[1] for first, part in zip(firsts, chunk, strict=True)]
            backward(surrogate)
        metrics["tokens"] = sum(batch[f"{side}_attention_mask"].sum() for side in sides_of(batch)).detach()
        return loss.detach(), metrics

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """The unscaled global-batch loss and the loss of every (layer, dim) that contributed."""
        draws = float(totals["draws"])
        out = {"loss": float(totals["contrastive_loss"]) / draws, "kl_loss": float(totals["kl_loss"]) / draws}
        for (layer, d), count in zip(
            [(layer, d) for layer in range(1, self.depth + 1) for d in self.dims],
            totals["term_count"].flatten(),
            strict=True,
        ):
            if count > 0:
                out[f"loss/layer{layer}_dim{d}"] = float(totals["term_loss"][layer - 1, self.dims.index(d)] / count)
                out[f"terms/layer{layer}_dim{d}"] = float(count)
        if self.dims_config.policy == "2dmse":
            spread = 0.0
            for name in ("drawn_layer", "drawn_dim"):
                mean = float(totals[name]) / draws
                out[name] = mean
                spread += max(0.0, float(totals[f"{name}_sq"]) / draws - mean**2)
            out["draw_rank_spread"] = spread
        return out


def chunk_bounds(rows: int, chunk_size: int) -> list[tuple[int, int]]:
    size = chunk_size or rows
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def negative_args(batch: dict[str, Any], embedded: list[torch.Tensor]) -> tuple[Any, Any]:
    """(negatives, negative_rows) for `objective`: (None, None) when the batch has no negative side."""
    if len(embedded) <= len(SIDES):
        return None, None
    return embedded[len(SIDES)], list(batch[NEGATIVE_ROWS])


def gathered_negatives(negatives: torch.Tensor, negative_rows: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's negatives as (layers, ranks x rows, width), one (maybe blank) row per sample,
    and the mask of real ones: a fixed shape per rank, whatever number of negatives each holds."""
    layers, _, width = negatives.shape
    present = [row for row, has in enumerate(negative_rows) if has]
    index = torch.tensor(present, dtype=torch.long, device=negatives.device)
    full = negatives.new_zeros(layers, len(negative_rows), width).index_copy(1, index, negatives)
    mask = torch.tensor([[float(has)] for has in negative_rows], device=negatives.device)
    return gather_keep_local(full), gather_keep_local(mask)[:, 0] > 0.5


def slice_pairs(batch: dict[str, Any], start: int, end: int, task: ContrastiveTask) -> dict[str, Any]:
    """Rows start:end of every side, with the images those rows hold (counted on the host by collate);
    the negative side's rows are those of the samples start:end that have one."""
    out: dict[str, Any] = {}
    for side in sides_of(batch):
        prefix = f"{side}_"
        lo, hi = start, end
        if side == NEGATIVE:
            has = list(batch[NEGATIVE_ROWS])
            lo, hi = sum(has[:start]), sum(has[:end])
            out[NEGATIVE_ROWS] = has[start:end]
        tokens, images = row_counts(batch, task.image_token_id, task.visual_tokens, task.pad_token_id, prefix)
        first, count = sum(images[:lo]), sum(images[lo:hi])
        out[f"{side}_input_ids"] = batch[f"{side}_input_ids"][lo:hi]
        out[f"{side}_attention_mask"] = batch[f"{side}_attention_mask"][lo:hi]
        out[f"{side}_pixel_values"] = batch[f"{side}_pixel_values"][first : first + count]
        out[f"{prefix}{ROW_TOKENS}"], out[f"{prefix}{ROW_IMAGES}"] = tokens[lo:hi], images[lo:hi]
    return out


def random_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@contextlib.contextmanager
def restored_random_state(state: dict[str, Any]) -> Iterator[None]:
    """Run a block from a saved RNG state, then continue the outer stream where it was."""
    outer = random_state()
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    try:
        yield
    finally:
        torch.set_rng_state(outer["cpu"])
        if "cuda" in outer:
            torch.cuda.set_rng_state(outer["cuda"])
