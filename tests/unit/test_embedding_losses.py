"""2DMSE, Starbucks and MRL-E on fixed tensors against hand computations written from each reference.

Each `*_reference` function below follows the cited code line by line, with mtrain's InfoNCE in
place of the reference's pluggable base loss; `term_set_loss` must give the same loss and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtrain.config import ConfigError, load_config
from mtrain.config.schema import EmbeddingDimsConfig
from mtrain.model.embedding_head import MatryoshkaClassifier
from mtrain.task.contrastive import Term, TermSet, draw_term_set, term_set_loss
from mtrain.task.embedding_losses import mrl_e_loss

DEPTH, WIDTH, ROWS, TAU = 4, 8, 5, 0.1


def hidden_states(seed: int = 0) -> torch.Tensor:
    """(DEPTH + 1, 2 * ROWS, WIDTH): like HF hidden_states, index 0 the input embeddings; queries then positives."""
    torch.manual_seed(seed)
    return torch.randn(DEPTH + 1, 2 * ROWS, WIDTH, dtype=torch.float64).float().requires_grad_()


def split(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows[..., :ROWS, :], rows[..., ROWS:, :]


def base_loss(rows: torch.Tensor) -> torch.Tensor:
    """The base contrastive loss on (2 * ROWS, k) embeddings: InfoNCE over cosine similarity."""
    q, p = split(F.normalize(rows, dim=-1))
    logits = q @ p.T / TAU
    return -(logits.diagonal() - logits.logsumexp(dim=1)).mean()


def mtrain_loss(hidden: torch.Tensor, term_set: TermSet, dims: EmbeddingDimsConfig) -> torch.Tensor:
    stack = hidden[term_set.layers]
    q, p = split(stack)
    loss, _, _ = term_set_loss(q, p, term_set, dims, TAU)
    return loss


def assert_same_loss_and_grads(hidden: torch.Tensor, ours: torch.Tensor, reference: torch.Tensor) -> None:
    (ours_grad,) = torch.autograd.grad(ours, hidden)
    (reference_grad,) = torch.autograd.grad(reference, hidden)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-4, atol=1e-6)
    assert reference_grad[DEPTH].abs().sum() > 0


def dims_config(*overrides: str) -> EmbeddingDimsConfig:
    cfg = load_config(
        None, ["task.objective=contrastive", f"model.tiny.num_layers={DEPTH}", "model.tiny.hidden_size=64", *overrides]
    )
    return cfg.matryoshka.dims


# ── 2DMSE ─────────────────────────────────────────────────────────────────────────────────────
def angle_reference(hidden: torch.Tensor, layer: int, dim: int, temperature: float) -> torch.Tensor:
    """SeanLee97/AnglE angle_emb/angle.py AngleTDMSETrainer.compute_loss (last 2DMSE revision, 74e5ba2..830e7bc^):
    teacher = the last hidden state, student = hidden_states[sample_layer], sample_layer in 1..N-1."""
    teacher_outputs, student_outputs = hidden[-1], hidden[layer]
    loss1 = base_loss(teacher_outputs)
    loss1 = loss1 + base_loss(student_outputs) / layer
    kl = F.kl_div(
        F.log_softmax(student_outputs / temperature, dim=-1),
        F.softmax(teacher_outputs / temperature, dim=-1),
        reduction="batchmean",
    )
    loss1 = loss1 + kl * temperature
    loss2 = base_loss(teacher_outputs[:, :dim]) + base_loss(student_outputs[:, :dim]) / layer
    return loss1 + loss2


def sentence_transformers_reference(
    hidden: torch.Tensor,
    layer: int,
    last_dims: list[int],
    layer_dims: list[int],
    weights: dict[int, float],
    kl_t: float,
) -> torch.Tensor:
    """sentence-transformers Matryoshka2dLoss = AdaptiveLayerLoss(MatryoshkaLoss(base)): the last layer's
    MatryoshkaLoss at its drawn dims, layer_idx = layer - 1 weighted 1 / (1 + layer_idx), and
    kl_div(log_softmax(layer / T), softmax(final / T), batchmean) * T on the untruncated embeddings."""
    loss = sum(weights[d] * base_loss(hidden[-1][:, :d]) for d in last_dims)
    layer_idx = layer - 1
    layer_loss = sum(weights[d] * base_loss(hidden[layer][:, :d]) for d in layer_dims)
    loss = loss + layer_loss / (1 + layer_idx) / 1 * 1.0
    final = F.softmax(hidden[-1] / kl_t, dim=-1)
    kl = F.kl_div(F.log_softmax(hidden[layer] / kl_t, dim=-1), final, reduction="batchmean")
    return loss + kl * kl_t * 1.0


def test_2dmse_angle_variant_equals_angle_compute_loss():
    dims = dims_config("matryoshka.dims.policy=2dmse", "matryoshka.dims.dims=[2,4,8]")
    assert dims.variant == "angle" and dims.resolved_kl_temperature == 1.0
    seen = set()
    for micro_batch in range(12):
        term_set = draw_term_set(dims, DEPTH, WIDTH, seed=1, step=0, micro_batch=micro_batch)
        layer, dim = term_set.drawn
        seen.add(term_set.drawn)
        assert 1 <= layer < DEPTH and dim in (2, 4)  # AnglE draws a smaller dim than the full width
        assert [(t.layer, t.dim, t.weight) for t in term_set.terms] == [
            (DEPTH, dim, 1.0),
            (DEPTH, WIDTH, 1.0),
            (layer, dim, 1 / layer),
            (layer, WIDTH, 1 / layer),
        ]
        hidden = hidden_states(micro_batch)
        assert_same_loss_and_grads(
            hidden, mtrain_loss(hidden, term_set, dims), angle_reference(hidden, layer, dim, 1.0)
        )
    assert len(seen) >= 4  # micro-batches of one step draw different (layer, dim)


def test_2dmse_angle_variant_with_another_kl_temperature():
    dims = dims_config(
        "matryoshka.dims.policy=2dmse", "matryoshka.dims.dims=[4,8]", "matryoshka.dims.kl_temperature=0.5"
    )
    term_set = draw_term_set(dims, DEPTH, WIDTH, seed=3, step=7)
    hidden = hidden_states(3)
    layer, dim = term_set.drawn
    assert_same_loss_and_grads(hidden, mtrain_loss(hidden, term_set, dims), angle_reference(hidden, layer, dim, 0.5))


@pytest.mark.parametrize("dims_per_step", [1, 2, 0])
def test_2dmse_sentence_transformers_variant_equals_matryoshka2d_loss(dims_per_step):
    dims = dims_config(
        "matryoshka.dims.policy=2dmse",
        "matryoshka.dims.dims=[2,4,8]",
        "matryoshka.dims.weights=[1.0,0.5,2.0]",
        "matryoshka.dims.variant=sentence_transformers",
        f"matryoshka.dims.dims_per_step={dims_per_step}",
    )
    assert dims.resolved_kl_temperature == 0.3
    weights = {2: 1.0, 4: 0.5, 8: 2.0}
    for micro_batch in range(4):
        term_set = draw_term_set(dims, DEPTH, WIDTH, seed=2, step=5, micro_batch=micro_batch)
        layer = term_set.drawn[0]
        last_dims = [t.dim for t in term_set.terms if t.layer == DEPTH]
        layer_dims = [t.dim for t in term_set.terms if t.layer == layer]
        assert len(last_dims) == len(layer_dims) == (dims_per_step or 3)
        hidden = hidden_states(micro_batch)
        reference = sentence_transformers_reference(hidden, layer, last_dims, layer_dims, weights, 0.3)
        assert_same_loss_and_grads(hidden, mtrain_loss(hidden, term_set, dims), reference)


def test_2dmse_settings_are_checked():
    with pytest.raises(ConfigError, match="variant=sentence_transformers"):
        dims_config("matryoshka.dims.policy=2dmse", "matryoshka.dims.dims=[4,8]", "matryoshka.dims.weights=[1,2]")
    with pytest.raises(ConfigError, match="dims_per_step: applies to policy 2dmse with variant sentence_transformers"):
        dims_config("matryoshka.dims.policy=2dmse", "matryoshka.dims.dims_per_step=2")
    with pytest.raises(ConfigError, match="variant: picks the 2dmse reference, but the policy is mrl"):
        dims_config("matryoshka.dims.variant=sentence_transformers")
    with pytest.raises(ConfigError, match="kl_temperature: sets the 2dmse KL"):
        dims_config(
            "matryoshka.dims.policy=starbucks",
            "matryoshka.dims.dims=[4,8]",
            "matryoshka.dims.layers=[2,4]",
            "matryoshka.dims.kl_temperature=0.3",
        )


# ── Starbucks ─────────────────────────────────────────────────────────────────────────────────
def starbucks_reference(
    hidden: torch.Tensor, layer_list: list[int], embedding_dim_list: list[int], normalize: bool, kl_weight: float
) -> torch.Tensor:
    """ielab/Starbucks retrieval/modeling.py SrlDenseModel.forward with sub_model_sampling=False:
    reps = hidden_states[layer_list] (optionally normalised at full width), scores = dot products of
    prefixes, the last listed layer at full width is the detached KL target and has its own loss."""
    reps = hidden[layer_list]
    if normalize:
        reps = F.normalize(reps, p=2, dim=-1)
    q_reps, p_reps = split(reps)
    num_layers, _, embedding_dim = q_reps.shape
    target = torch.arange(q_reps.size(1))
    all_scores = torch.einsum("lqh,ldh -> lqdh", q_reps, p_reps)
    last_layer_index = num_layers - 1
    full_layer_scores = all_scores[last_layer_index].sum(dim=-1)
    total_loss = F.cross_entropy(full_layer_scores / TAU, target)
    target_scores = full_layer_scores.detach()
    for layer_idx, dim in zip(range(num_layers), embedding_dim_list, strict=True):
        if layer_idx == last_layer_index and dim == embedding_dim:
            continue
        layer_scores = all_scores[layer_idx, :, :, :dim].sum(dim=-1)
        total_loss = total_loss + F.cross_entropy(layer_scores / TAU, target)
        kl = F.kl_div(
            F.log_softmax(layer_scores / TAU, dim=1), F.softmax(target_scores / TAU, dim=1), reduction="batchmean"
        )
        total_loss = total_loss + kl_weight * kl
    return total_loss


@pytest.mark.parametrize(
    ("layers", "sizes", "scoring"),
    [
        ([1, 2, 3, 4], [2, 4, 6, 8], "auto"),
        ([1, 2, 3], [2, 4, 8], "auto"),  # stops below the last layer: layer 3 is the teacher
        ([1, 1, 3], [2, 4, 8], "normalised_dot"),
    ],
)
def test_starbucks_equals_srl_dense_model_forward(layers, sizes, scoring):
    dims = dims_config(
        "matryoshka.dims.policy=starbucks",
        f"matryoshka.dims.dims={sizes}",
        f"matryoshka.dims.layers={layers}",
        f"matryoshka.dims.scoring={scoring}",
        "matryoshka.dims.kl_weight=0.7",
    )
    term_set = draw_term_set(dims, DEPTH, WIDTH, seed=0, step=0)
    assert term_set.kl_teacher == (layers[-1], WIDTH)
    assert term_set.kl_students == tuple(zip(layers[:-1], sizes[:-1], strict=True))
    assert term_set == draw_term_set(dims, DEPTH, WIDTH, seed=5, step=9, micro_batch=1)  # a fixed list: no draws
    hidden = hidden_states(1)
    reference = starbucks_reference(hidden, layers, sizes, scoring == "normalised_dot", 0.7)
    ours = mtrain_loss(hidden, term_set, dims)
    (ours_grad,) = torch.autograd.grad(ours, hidden)
    (reference_grad,) = torch.autograd.grad(reference, hidden)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-4, atol=1e-6)
    assert ours_grad[4].abs().sum() == 0 if layers[-1] < DEPTH else ours_grad[4].abs().sum() > 0


# ── MRL-E ─────────────────────────────────────────────────────────────────────────────────────
def test_mrl_e_loss_and_grads_equal_a_sliced_shared_classifier():
    """RAIVNLab/MRL MRL.py MRL_Linear_Layer(efficient=True): logits_k = x[:, :k] W[:, :k]^T + b,
    Matryoshka_CE_Loss sums relative_importance[k] * CE(logits_k)."""
    torch.manual_seed(0)
    head = MatryoshkaClassifier(width=8, num_classes=5, dims=[2, 4, 8])
    features = torch.randn(6, 8, requires_grad=True)
    labels = torch.randint(0, 5, (6,))
    weights = [1.0, 0.5, 2.0]
    ours = mrl_e_loss(features, labels, head.weight, head.bias, head.dims, weights)
    params = [features, head.weight, head.bias]
    ours_grads = torch.autograd.grad(ours, params)
    w, b = head.weight, head.bias
    reference = sum(
        c * -F.log_softmax(features[:, :k] @ w[:, :k].t() + b, dim=1)[torch.arange(6), labels].mean()
        for k, c in zip([2, 4, 8], weights, strict=True)
    )
    reference_grads = torch.autograd.grad(reference, params)
    torch.testing.assert_close(ours, reference)
    for got, expected in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_plan_layers_include_the_teacher():
    term_set = TermSet((Term(1, 4, 1.0),), ((1, 4),), (3, 8))
    assert term_set.layers == [1, 3]


def test_retrieval_eval_ranks_by_the_trained_scoring():
    from mtrain.eval.retrieval import recall_at

    queries = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.1], [3.0, 2.0]])  # entry 0 is closer in angle, entry 1 larger in dot
    targets = torch.tensor([0])
    assert recall_at(queries, gallery, targets, 2, "cosine")[1] == 1.0
    assert recall_at(queries, gallery, targets, 2, "dot")[1] == 0.0
