"""Contrastive embedding training (VLM2Vec) with Matryoshka dims (MRL) and layers (2DMSE, Starbucks).

One step:

    queries + positives (+ hard negatives), one row each ─► vision tower + LM once, every hidden state kept
        ─► pool each layer the step uses ─► (layers, rows, width)
    gather every rank's embeddings (the local slice put back, so its gradient flows)
    loss = Σ_terms weight · InfoNCE(scores of the first k dims of layer l / temperature;
                                    candidates: every positive, then every hard negative)
         + kl_weight · Σ_students KL(teacher ‖ student)      (2DMSE: of embeddings; Starbucks: of scores)

The formulas live in `embedding_losses` and docs/objectives.md. Which (layer, dim) terms a
micro-batch has is a `TermSet`, drawn from (seed, step, micro-batch) alone, so every rank
holds the same terms and runs the same modules (ZeRO-3 gathers in the same order everywhere).

Every rank computes the loss of the whole global batch, but its backward reaches only its own
slice; the sum of the ranks' gradients is then the global-batch gradient. DeepSpeed averages
over ranks, so the loss handed to backward is scaled by the world size (see `summarize`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data_pipeline.collate import IMAGE_GRID_THW, IMAGE_SIZES, ROW_IMAGES, ROW_TOKENS
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.config.schema import ContrastiveConfig, EmbeddingDimsConfig
from mtrain.model.embedding_head import EmbeddingHead, MatryoshkaClassifier, check_dims
from mtrain.model.families.base import ModelFamily
from mtrain.task.base import Task
from mtrain.task.draws import draw_random, draw_slots, rank_spread
from mtrain.task.embedding_losses import embedding_kl, info_nce, mrl_e_loss, prefix_scores, score_kl
from mtrain.task.token_layout import Layout, row_counts

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
class TermSet:
    """One micro-batch's InfoNCE terms, and the (layer, dim) students its KL aligns to `kl_teacher`."""

    terms: tuple[Term, ...]
    kl_students: tuple[tuple[int, int], ...] = ()
    kl_teacher: tuple[int, int] | None = None
    drawn: tuple[int, int] = (0, 0)  # 2dmse: the drawn (shallow layer, dim), for the draw metrics

    @property
    def layers(self) -> list[int]:
        """Layers whose embeddings the step needs, increasing (a fixed order on every rank)."""
        used = {t.layer for t in self.terms} | {layer for layer, _ in self.kl_students}
        if self.kl_teacher is not None:
            used.add(self.kl_teacher[0])
        return sorted(used)


def draw_term_set(
    dims: EmbeddingDimsConfig, depth: int, width: int, seed: int, step: int, micro_batch: int = 0
) -> TermSet:
    """The (layer, dim) terms of one micro-batch: a pure function of (config, seed, step, micro-batch),
    the same on every rank. docs/objectives.md gives each policy's formula and reference."""
    sizes = check_dims(dims.dims, width)
    weights = dims.weights or [1.0] * len(sizes)
    full = sizes[-1]
    if dims.policy == "mrl":
        return TermSet(tuple(Term(depth, d, w) for d, w in zip(sizes, weights, strict=True)))
    if dims.policy == "starbucks":
        # The pairs grow in layer and dim, so the last is the largest: it is the KL teacher
        # (SrlDenseModel.forward: the last listed layer at full width) and has its own loss.
        pairs = list(zip(dims.layers, sizes, strict=True))
        terms = tuple(Term(layer, d, w) for (layer, d), w in zip(pairs, weights, strict=True))
        return TermSet(terms, tuple(pairs[:-1]), pairs[-1])
    draw = draw_random(seed, step, micro_batch, "2dmse")  # never keyed by rank
    layer = draw.choice(dims.layers or list(range(1, depth)))
    shallow = 1.0 / layer  # both references weight layer l's terms by 1/l (l = 1-based layer number)
    if dims.variant == "angle":
        # AngleTDMSETrainer.compute_loss: full width plus one drawn smaller dim, at both layers.
        dim = draw.choice(sizes[:-1] or sizes)
        widths = sorted({full, dim})
        terms = tuple(Term(depth, d, 1.0) for d in widths) + tuple(Term(layer, d, shallow) for d in widths)
    else:
        # Matryoshka2dLoss: each layer's MatryoshkaLoss draws its own `dims_per_step` dims.
        count = dims.dims_per_step or len(sizes)

        def some_dims() -> list[int]:
            return sorted(draw.sample(range(len(sizes)), count)) if count < len(sizes) else list(range(len(sizes)))

        terms = tuple(Term(depth, sizes[i], weights[i]) for i in some_dims())
        shallow_dims = some_dims()
        terms += tuple(Term(layer, sizes[i], weights[i] * shallow) for i in shallow_dims)
        dim = sizes[shallow_dims[0]]
    return TermSet(terms, ((layer, full),), (depth, full), (layer, dim))


def term_set_loss(
    queries: torch.Tensor,
    positives: torch.Tensor,
    term_set: TermSet,
    dims: EmbeddingDimsConfig,
    temperature: float,
    negatives: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(loss, each term's InfoNCE, the KL) of (layers, rows, width) embeddings whose layers are `term_set.layers`.

    loss = Σ_terms weight · InfoNCE + kl_weight · KL; every piece is a tensor on the embeddings' device.
    `negatives` (layers, rows, width) are hard negatives, extra InfoNCE candidates of every query
    where `negative_mask` is true; the KL terms look at queries and positives only.
    """
    index = {layer: i for i, layer in enumerate(term_set.layers)}
    scoring = dims.resolved_scoring

    def term_loss(t: Term) -> torch.Tensor:
        at = index[t.layer]
        scores = prefix_scores(queries[at], positives[at], t.dim, scoring)
        negative_scores = None if negatives is None else prefix_scores(queries[at], negatives[at], t.dim, scoring)
        return info_nce(scores, temperature, negative_scores, negative_mask)

    term_losses = [term_loss(t) for t in term_set.terms]
    loss = torch.stack([t.weight * term for t, term in zip(term_set.terms, term_losses, strict=True)]).sum()
    kl_total = kl_loss(queries, positives, term_set, index, dims, temperature)
    return loss + dims.kl_weight * kl_total, term_losses, kl_total


def kl_loss(
    queries: torch.Tensor,
    positives: torch.Tensor,
    term_set: TermSet,
    index: dict[int, int],
    dims: EmbeddingDimsConfig,
    temperature: float,
) -> torch.Tensor:
    """The KL alignment of every student (layer, dim) of `term_set` to its teacher (layer, dim)."""
    kl_total = queries.new_zeros((), dtype=torch.float32)
    if term_set.kl_teacher is None:
        return kl_total
    teacher_layer, teacher_dim = term_set.kl_teacher
    if dims.policy == "2dmse":
        # Over every row's embedding (queries and positives alike), the teacher trained as well.
        rows = torch.cat([queries, positives], dim=-2)
        teacher = rows[index[teacher_layer], :, :teacher_dim]
        for layer, dim in term_set.kl_students:
            kl_total = kl_total + embedding_kl(teacher, rows[index[layer], :, :dim], dims.resolved_kl_temperature)
        return kl_total
    # Starbucks: each query's score distribution over the positives, at the contrastive temperature.
    at = index[teacher_layer]
    teacher_scores = prefix_scores(queries[at], positives[at], teacher_dim, dims.resolved_scoring)
    for layer, dim in term_set.kl_students:
        at = index[layer]
        student_scores = prefix_scores(queries[at], positives[at], dim, dims.resolved_scoring)
        kl_total = kl_total + score_kl(teacher_scores, student_scores, temperature)
    return kl_total


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
        family: ModelFamily | None = None,
        visual_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(model)
        # How this model's images become tokens and its tokens get positions (None: the registry's).
        self.given_family = family
        self.visual_grid = visual_grid  # (rows, columns) of every image's tokens (Qwen's merged grid)
        text_config = self.llava.config.get_text_config()
        self.head = EmbeddingHead(text_config.hidden_size, contrastive.pooling, contrastive.projection_dim)
        # MRL-E: one classifier for every dim, W sliced W[:, :k] (Kusupati et al.).
        self.classifier = MatryoshkaClassifier(self.head.out_width, dims.classes, dims.dims) if dims.classes else None
        self.contrastive = contrastive
        self.dims_config = dims
        self.dims = check_dims(dims.dims, self.head.out_width)
        self.depth = text_config.num_hidden_layers
        if any(layer > self.depth for layer in dims.layers):
            raise ValueError(f"matryoshka.dims.layers={dims.layers} name layers beyond the model's {self.depth}")
        if dims.policy == "2dmse" and self.depth in dims.layers:
            raise ValueError(
                f"matryoshka.dims.layers={dims.layers} holds the last layer {self.depth}, which 2dmse always trains; "
                "list only the shallower layers to draw from"
            )
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.visual_tokens = visual_tokens
        self.seed = seed
        self.step = 0
        self.micro_batch = 0
        self.chunk_size = contrastive.chunk_size

    def begin_step(self, step: int, micro_batch: int = 0) -> None:
        """Key the next forward's draws: each accumulated micro-batch draws anew, as the references do per forward."""
        self.step = step
        self.micro_batch = micro_batch

    def evaluated_layers(self) -> list[int]:
        """The last layer, plus every layer the 2D policies train (2dmse without a list: all of them)."""
        policy, layers = self.dims_config.policy, self.dims_config.layers
        if policy == "2dmse" and not layers:
            return list(range(1, self.depth + 1))
        return sorted({*layers, self.depth}) if policy != "mrl" else [self.depth]

    def term_set(self) -> TermSet:
        return draw_term_set(self.dims_config, self.depth, self.head.out_width, self.seed, self.step, self.micro_batch)

    # ── embedding ─────────────────────────────────────────────────────────────────────────────
    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        layers: list[int],
        image_sizes: list[tuple[int, int]] | None = None,
        image_grid_thw: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """Pooled embeddings of every row at each of `layers`: (len(layers), rows, width).

        The vision tower runs on every call, on a blank image when the rows hold none, and the
        language model once with all hidden states: the module sequence never depends on the data.
        Images become tokens, and tokens positions and attention, by the model's family (the hooks
        the token tasks use): Qwen's merged grid and M-RoPE ids, anyres crops by `image_sizes`,
        Gemma 3's bidirectional attention within an image; at Qwen's native resolution (`image_grid_thw`, every
        image's patches in one sequence) each image its own grid, its M-RoPE ids from that grid.
        """
        embeddings = self.llava.get_input_embeddings()(input_ids)
        visual_inputs: dict[str, Any] = {}  # what else of the images the language model takes (DeepStack)
        if pixel_values.shape[0] == 0:
            embeddings = embeddings + self.vision_stand_in(embeddings.device).to(embeddings.dtype)
        else:
            if image_grid_thw:
                features = torch.cat(self.grid_features(pixel_values, image_grid_thw))
            else:
                features = self.image_features(pixel_values.to(self.input_dtype), image_sizes).flatten(0, 1)
            is_image = input_ids == self.image_token_id
            embeddings, visual_inputs = self.family.splice_visual(self.llava, embeddings, is_image, features)
        hidden_states = self.family.language_model(self.llava)(
            inputs_embeds=embeddings,
            output_hidden_states=True,
            use_cache=False,
            **self.language_model_inputs(input_ids, attention_mask, image_grid_thw),
            **visual_inputs,
        ).hidden_states
        return torch.stack([self.head(hidden_states[layer], attention_mask) for layer in layers])

    def language_model_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: list[list[int]] | None = None
    ) -> dict[str, Any]:
        """The attention mask, position ids and the family's own inputs of rows embedded whole, every image at
        full size: the rows as a padded token layout of one document each (positions from the mask; each image's
        own grid in `image_grid_thw` at native resolution)."""
        real = attention_mask.bool()
        layout = Layout(
            input_ids=input_ids,
            labels=torch.full_like(input_ids, IGNORE_INDEX),  # embeddings learn no tokens
            position_ids=(attention_mask.long().cumsum(1) - 1).clamp(min=0),
            attention_mask=attention_mask,
            token_scales=real.long() * self.visual_tokens,  # every image at its full count
            variants=[],
            image_grids=image_grid_thw or None,  # images of their own grids (native resolution), unpooled
        )
        family = self.family
        positions = family.layout_position_ids(self.llava, layout, self.visual_grid, self.image_token_id, False)
        inputs = {"attention_mask": attention_mask, "position_ids": positions}
        return inputs | family.language_model_inputs(self.llava, layout, self.image_token_id, False)

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
        # A side without images holds (0, 3, S, S), whatever shape the family's pixels have (Qwen's patches, crops).
        pixel_parts = [batch[f"{side}_pixel_values"] for side in sides]
        pixel_values = torch.cat([part for part in pixel_parts if part.shape[0]] or pixel_parts[:1])
        sizes = [tuple(size) for side in sides for size in batch.get(f"{side}_{IMAGE_SIZES}") or []]
        grids = [grid for side in sides for grid in batch.get(f"{side}_{IMAGE_GRID_THW}") or []]
        embeddings = self.encode(input_ids, mask, pixel_values, layers, sizes or None, grids or None)
        return list(embeddings.split(rows, dim=1))

    # ── the loss ──────────────────────────────────────────────────────────────────────────────
    def objective(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        term_set: TermSet,
        negatives: torch.Tensor | None = None,
        negative_rows: list[bool] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Global-batch loss from this rank's (layers, rows, width) embeddings, scaled by the world size.

        `negatives` holds the hard negatives of the samples marked in `negative_rows`, in order."""
        queries, positives = gather_keep_local(queries), gather_keep_local(positives)
        negative_mask = None
        if negatives is not None:
            negatives, negative_mask = gathered_negatives(negatives, negative_rows or [])
        loss, term_losses, kl_total = term_set_loss(
            queries, positives, term_set, self.dims_config, self.contrastive.temperature, negatives, negative_mask
        )
        device = queries.device
        # Per-term losses stay on the device; the counts are known on the host.
        term_grid = torch.zeros(self.depth, len(self.dims), dtype=torch.float64, device=device)
        counts = [[0.0] * len(self.dims) for _ in range(self.depth)]
        for term, term_loss in zip(term_set.terms, term_losses, strict=True):
            cell = (term.layer - 1, self.dims.index(term.dim))
            term_grid[cell] += term_loss.detach().double()
            counts[cell[0]][cell[1]] += 1
        drawn = Term(*term_set.drawn, 0.0)  # (0, 0) outside 2dmse
        metrics = {
            "contrastive_loss": loss.detach().double(),
            "kl_loss": kl_total.detach().double(),
            "term_loss": term_grid,
            "term_count": torch.tensor(counts, dtype=torch.float64, device=device),
            # Summed over micro-batches and ranks by the trainer: identical draws leave a zero spread.
            "drawn_layer": torch.tensor(float(drawn.layer), device=device),
            "drawn_dim": torch.tensor(float(drawn.dim), device=device),
            "draws": torch.tensor(1.0, device=device),
            **draw_slots("drawn_layer", drawn.layer, self.micro_batch, device=device),
            **draw_slots("drawn_dim", drawn.dim, self.micro_batch, device=device),
        }
        return loss * world_size(), metrics

    # ── the two step paths ────────────────────────────────────────────────────────────────────
    def forward(self, batch: dict[str, Any], embed_layers: list[int] | None = None) -> Any:
        """The step's loss and metrics; with `embed_layers`, only the (queries, positives) embeddings."""
        if embed_layers is not None:
            return tuple(self.encode_sides(batch, embed_layers, sides_of(batch)))
        term_set = self.term_set()
        sides = sides_of(batch)
        embedded = self.encode_sides(batch, term_set.layers, sides)
        queries = embedded[0]
        loss, metrics = self.objective(*embedded[:2], term_set, *negative_args(batch, embedded))
        if self.classifier is not None:
            classifier_loss = self.classifier_loss(queries[-1], batch)
            loss = loss + self.dims_config.classifier_weight * classifier_loss
            metrics["classifier_loss"] = classifier_loss.detach().double()
        metrics["tokens"] = sum(batch[f"{side}_attention_mask"].sum() for side in sides).detach()
        return loss, metrics

    def classifier_loss(self, queries: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """MRL-E cross-entropy of this rank's query embeddings (the deepest layer the step embeds) at every dim.

        Local rows only, unscaled: DeepSpeed's mean over ranks is then the global-batch mean.
        """
        if "labels" not in batch:
            raise ValueError(
                "matryoshka.dims.classes is set but the batch has no labels: give every pair a KEY.label.cls "
                "(an integer class) or set matryoshka.dims.classes=0"
            )
        weights = self.dims_config.weights or [1.0] * len(self.dims)
        classifier = self.classifier
        return mrl_e_loss(queries, batch["labels"], classifier.weight, classifier.bias, self.dims, weights)

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
        term_set = self.term_set()
        chunks = chunk_bounds(batch["query_input_ids"].shape[0], self.chunk_size)
        rng_states, embedded = [], []
        with torch.no_grad():
            for start, end in chunks:
                rng_states.append(random_state())  # replayed below, so dropout masks match
                embedded.append(forward(slice_pairs(batch, start, end, self), embed_layers=term_set.layers))
        # Per side, every chunk's rows in order: the whole batch's embeddings, without a graph.
        whole = [torch.cat(parts, dim=1).requires_grad_() for parts in zip(*embedded, strict=True)]
        loss, metrics = self.objective(*whole[:2], term_set, *negative_args(batch, whole))
        grads = torch.autograd.grad(loss, whole)
        firsts = [0] * len(whole)  # where each side's rows of the next chunk start
        for (start, end), state in zip(chunks, rng_states, strict=True):
            with restored_random_state(state):
                chunk = forward(slice_pairs(batch, start, end, self), embed_layers=term_set.layers)
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
        if "classifier_loss" in totals:
            out["classifier_loss"] = float(totals["classifier_loss"]) / draws
        for (layer, d), count in zip(
            [(layer, d) for layer in range(1, self.depth + 1) for d in self.dims],
            totals["term_count"].flatten(),
            strict=True,
        ):
            if count > 0:
                out[f"loss/layer{layer}_dim{d}"] = float(totals["term_loss"][layer - 1, self.dims.index(d)] / count)
                out[f"terms/layer{layer}_dim{d}"] = float(count)
        if self.dims_config.policy == "2dmse":
            for name in ("drawn_layer", "drawn_dim"):
                out[name] = float(totals[name]) / draws
            out["draw_rank_spread"] = rank_spread(totals, "drawn_layer") + rank_spread(totals, "drawn_dim")
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
        pixel_rows = (first, first + count)
        if f"{prefix}{IMAGE_GRID_THW}" in batch:  # native resolution: pixel rows are every image's patches
            grids = batch[f"{prefix}{IMAGE_GRID_THW}"]
            out[f"{prefix}{IMAGE_GRID_THW}"] = grids[first : first + count]
            patches = [t * h * w for t, h, w in grids]
            pixel_rows = (sum(patches[:first]), sum(patches[: first + count]))
        out[f"{side}_pixel_values"] = batch[f"{side}_pixel_values"][pixel_rows[0] : pixel_rows[1]]
        if f"{prefix}{IMAGE_SIZES}" in batch:
            out[f"{prefix}{IMAGE_SIZES}"] = batch[f"{prefix}{IMAGE_SIZES}"][first : first + count]
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
