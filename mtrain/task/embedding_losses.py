"""The embedding objectives' terms as pure functions of tensors (no host syncs, no new devices).

Each function cites the reference it follows; docs/objectives.md writes out the formulas.

    queries, positives (rows, width) ──► prefix_scores(dim, scoring) ──► info_nce (+ hard negatives' scores)
    2DMSE:     embedding_kl   T·KL between softmaxes of the embeddings themselves, teacher trained
    Starbucks: score_kl       KL between in-batch score distributions, teacher detached
    MRL-E:     mrl_e_loss     one classifier sliced W[:, :k] for every prefix length k
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.model.embedding_head import mrl_e_logits

Scoring = Literal["cosine", "dot", "normalised_dot"]


def prefix_scores(queries: torch.Tensor, positives: torch.Tensor, dim: int, scoring: Scoring) -> torch.Tensor:
    """Query-by-positive scores of the first `dim` coordinates: (queries, positives).

    cosine: the prefixes L2 re-normalised (MRL, 2DMSE: sentence-transformers `MatryoshkaLoss.shrink`);
    dot: the raw prefixes' dot product (Starbucks `SrlDenseModel.forward`, Tevatron's default);
    normalised_dot: prefixes of the full-width-normalised embeddings (Starbucks with `normalize`).
    """
    if not 1 <= dim <= queries.shape[-1]:
        raise ValueError(f"dim={dim} is outside 1..{queries.shape[-1]}, the embedding width")
    queries, positives = queries.float(), positives.float()
    if scoring == "cosine":
        queries, positives = F.normalize(queries[..., :dim], dim=-1), F.normalize(positives[..., :dim], dim=-1)
    elif scoring == "normalised_dot":
        queries, positives = F.normalize(queries, dim=-1)[..., :dim], F.normalize(positives, dim=-1)[..., :dim]
    elif scoring == "dot":
        queries, positives = queries[..., :dim], positives[..., :dim]
    else:
        raise ValueError(f"scoring must be cosine, dot or normalised_dot, got {scoring!r}")
    return queries @ positives.T


def info_nce(
    scores: torch.Tensor,
    temperature: float,
    negative_scores: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of query i against positive i among every positive of the batch.

    `negative_scores` (queries, hard negatives) are extra candidates of every query (VLM2Vec / MMEB,
    Tevatron's `train_group_size`); columns whose `negative_mask` is false are left out, as a
    sample without a negative holds a blank row there.
    """
    if negative_scores is not None:
        if negative_mask is not None:
            negative_scores = negative_scores.masked_fill(~negative_mask, float("-inf"))  # exp(-inf) = 0
        scores = torch.cat([scores, negative_scores], dim=1)
    targets = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(scores / temperature, targets)


def embedding_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """T · KL(softmax(teacher / T) ‖ softmax(student / T)) over the embedding coordinates, mean over rows.

    2DMSE as in AnglE `AngleTDMSETrainer.compute_loss` and sentence-transformers
    `AdaptiveLayerLoss.forward`: the softmax runs over each embedding's own coordinates (not over
    in-batch similarities), and the teacher is not detached, so the last layer is pulled too.
    """
    student_log = F.log_softmax(student.float() / temperature, dim=-1)
    teacher_probs = F.softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(student_log, teacher_probs, reduction="batchmean") * temperature


def score_kl(teacher_scores: torch.Tensor, student_scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) ‖ softmax(student / T)) of each query's scores over the positives.

    Starbucks `SrlDenseModel.forward`: the teacher's scores are detached, T is the contrastive temperature.
    """
    student_log = F.log_softmax(student_scores / temperature, dim=-1)
    teacher_probs = F.softmax(teacher_scores.detach() / temperature, dim=-1)
    return F.kl_div(student_log, teacher_probs, reduction="batchmean")


def mrl_e_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    dims: list[int],
    dim_weights: list[float],
) -> torch.Tensor:
    """Σ_k c_k · CE(features[:, :k] Wᵀ[:k] + b, labels): MRL-E (Kusupati et al., `MRL.py` `MRL_Linear_Layer`
    with `efficient=True`), one weight shared by every prefix length."""
    terms = [
        c * F.cross_entropy(mrl_e_logits(features, weight, bias, k), labels, ignore_index=IGNORE_INDEX)
        for k, c in zip(dims, dim_weights, strict=True)
    ]
    return torch.stack(terms).sum()
