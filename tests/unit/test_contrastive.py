"""Embedding head, MRL / 2DMSE / Starbucks losses against hand computations, and GradCache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtrain.config import ConfigError, load_config
from mtrain.model.build import build_model
from mtrain.model.embedding_head import MatryoshkaClassifier, check_dims, pool_last_token, pool_mean
from mtrain.task.contrastive import draw_term_set
from mtrain.task.embedding_losses import mrl_e_loss
from mtrain.task.registry import build_task


def make_task(*overrides: str):
    defaults = [
        "task.objective=contrastive",
        "model.freeze.language_model=false",
        "model.tiny.num_layers=4",
        "task.contrastive.temperature=0.1",
    ]
    given = {override.split("=", 1)[0] for override in overrides}  # a key may be given once only
    cfg = load_config(None, [d for d in defaults if d.split("=", 1)[0] not in given] + list(overrides))
    built = build_model(cfg.model, torch.float32, None, seed=0)
    return build_task(cfg, built, rank=0), built, cfg


def make_batch(built, rows: int = 6) -> dict:
    """Queries: image + instruction; positives: caption text of varying length (right-padded)."""
    import random

    from data_pipeline.pairs import PairSpec, collate_pairs, encode_side
    from data_pipeline.sample_data import COLOURS, SHAPES, draw_shape

    rng = random.Random(0)
    spec = PairSpec(built.tokenizer, built.image_token_id, built.visual_tokens, 96, 32)
    samples = []
    for row in range(rows):
        colour, shape = list(COLOURS)[row % 8], SHAPES[row % 4]
        caption = f"a {colour} {shape}." + (" it is big." if row % 2 else "")
        samples.append(
            {
                "key": str(row),
                "query": encode_side(spec, draw_shape(colour, shape, rng), "", "Represent the image"),
                "positive": encode_side(spec, None, caption),
            }
        )
    return collate_pairs(samples, spec, built.image_processor)


def hand_info_nce(q: torch.Tensor, p: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    q = q[:, :k] / q[:, :k].norm(dim=1, keepdim=True)
    p = p[:, :k] / p[:, :k].norm(dim=1, keepdim=True)
    logits = q @ p.T / temperature
    return -(logits.diagonal() - logits.logsumexp(dim=1)).mean()


def hand_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    t = (teacher / temperature).softmax(dim=1)
    s = (student / temperature).log_softmax(dim=1)
    return (t * (t.log() - s)).sum(dim=1).mean()


def cosine(q: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
    return F.normalize(q[:, :k], dim=1) @ F.normalize(p[:, :k], dim=1).T


# ── head ──────────────────────────────────────────────────────────────────────────────────────
def test_last_token_pooling_is_padding_side_aware_and_mean_ignores_padding():
    torch.manual_seed(0)
    lengths = [3, 5, 2]
    states = [torch.randn(n, 4) for n in lengths]
    right = torch.zeros(3, 5, 4)
    left = torch.zeros(3, 5, 4)
    right_mask = torch.zeros(3, 5, dtype=torch.long)
    left_mask = torch.zeros(3, 5, dtype=torch.long)
    for row, s in enumerate(states):
        n = len(s)
        right[row, :n], right_mask[row, :n] = s, 1
        left[row, 5 - n :], left_mask[row, 5 - n :] = s, 1
        right[row, n:] = 99.0  # padding content must never be read
        left[row, : 5 - n] = 99.0
    expected_last = torch.stack([s[-1] for s in states])
    torch.testing.assert_close(pool_last_token(right, right_mask), expected_last)
    torch.testing.assert_close(pool_last_token(left, left_mask), expected_last)
    expected_mean = torch.stack([s.mean(0) for s in states])
    torch.testing.assert_close(pool_mean(right, right_mask), expected_mean)
    torch.testing.assert_close(pool_mean(left, left_mask), expected_mean)


def test_dims_are_validated_against_order_and_width():
    with pytest.raises(ConfigError, match="strictly increasing"):
        load_config(None, ["task.objective=contrastive", "matryoshka.dims.dims=[16,8]"])
    with pytest.raises(ConfigError, match="exceeds the embedding width 64"):
        load_config(None, ["task.objective=contrastive", "matryoshka.dims.dims=[8,128]"])
    with pytest.raises(ConfigError, match="cannot be packed"):
        load_config(None, ["task.objective=contrastive", "data.packing=true"])
    with pytest.raises(ConfigError, match="only task.objective=contrastive"):
        load_config(None, ["matryoshka.dims.dims=[8,16]"])
    with pytest.raises(ConfigError, match="as many layers as dims"):
        load_config(
            None, ["task.objective=contrastive", "matryoshka.dims.policy=starbucks", "matryoshka.dims.dims=[8]"]
        )
    with pytest.raises(ConfigError, match="projection head is not part of the Hugging Face export"):
        load_config(None, ["task.objective=contrastive", "task.contrastive.projection_dim=128"])
    assert load_config(
        None,
        [
            "task.objective=contrastive",
            "task.contrastive.projection_dim=128",
            "matryoshka.dims.dims=[8,128]",
            "checkpoint.export_at_end=false",
        ],
    )
    with pytest.raises(ValueError, match="beyond the embedding width 32"):
        check_dims([8, 64], 32)
    assert check_dims([], 32) == [32]


def test_mrl_e_classifier_slices_one_weight():
    torch.manual_seed(0)
    head = MatryoshkaClassifier(width=16, num_classes=5, dims=[4, 8, 16])
    assert [name for name, _ in head.named_parameters()] == ["weight", "bias"]
    features, labels = torch.randn(7, 16), torch.randint(0, 5, (7,))
    logits = {k: head.logits(features, k) for k in head.dims}
    for k in (4, 8, 16):
        torch.testing.assert_close(logits[k], features[:, :k] @ head.weight[:, :k].T + head.bias)
    expected = sum(
        2.0 * F.cross_entropy(logits[k], labels) if k == 8 else F.cross_entropy(logits[k], labels) for k in (4, 8, 16)
    )
    loss = mrl_e_loss(features, labels, head.weight, head.bias, head.dims, [1.0, 2.0, 1.0])
    torch.testing.assert_close(loss, expected)
    mrl_e_loss(features, labels, head.weight, head.bias, head.dims, [1.0, 1.0, 1.0]).backward()
    assert head.weight.grad[:, 8:].abs().sum() > 0 and head.weight.grad[:, :4].abs().sum() > 0


# ── losses ────────────────────────────────────────────────────────────────────────────────────
def test_mrl_loss_is_the_weighted_sum_of_per_dim_info_nce():
    dims, weights = [8, 16, 32, 64], [1.0, 0.5, 2.0, 1.5]
    task, built, _ = make_task(f"matryoshka.dims.dims={dims}", f"matryoshka.dims.weights={weights}")
    batch = make_batch(built)
    loss, metrics = task(batch)
    q, p = task.encode_pairs(batch, [4])
    expected = sum(w * hand_info_nce(q[0], p[0], k, 0.1) for k, w in zip(dims, weights, strict=True))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    summary = task.summarize(metrics)
    for k in dims:
        torch.testing.assert_close(
            summary[f"loss/layer4_dim{k}"], float(hand_info_nce(q[0], p[0], k, 0.1).detach()), rtol=1e-5, atol=1e-5
        )
    assert sorted(key for key in summary if key.startswith("terms/")) == sorted(f"terms/layer4_dim{k}" for k in dims)
    # The dims see different losses: a truncated embedding is not the full one.
    assert len({round(summary[f"loss/layer4_dim{k}"], 4) for k in dims}) == len(dims)


def test_2dmse_draws_one_shallow_pair_per_micro_batch_identically_and_trains_the_angle_objective():
    dims = [8, 16, 32, 64]
    task, built, cfg = make_task(f"matryoshka.dims.dims={dims}", "matryoshka.dims.policy=2dmse")
    drawn = set()
    for step in range(24):
        term_set = draw_term_set(cfg.matryoshka.dims, 4, 64, seed=cfg.run.seed, step=step)
        # The draw depends on (seed, step, micro-batch) only: recomputing it (as another rank does) gives the same.
        assert term_set == draw_term_set(cfg.matryoshka.dims, 4, 64, seed=cfg.run.seed, step=step)
        layer, dim = term_set.drawn
        assert 1 <= layer <= 3 and dim in dims[:-1]
        # AnglE: the last layer at full width and at the drawn dim; layer l at both, weighted 1/l.
        assert [(t.layer, t.dim, t.weight) for t in term_set.terms] == [(4, dim, 1.0), (4, 64, 1.0)] + [
            (layer, dim, 1 / layer),
            (layer, 64, 1 / layer),
        ]
        assert term_set.kl_students == ((layer, 64),) and term_set.kl_teacher == (4, 64)
        drawn.add((layer, dim))
    assert len(drawn) >= 6  # the draws move around the grid
    assert {draw_term_set(cfg.matryoshka.dims, 4, 64, seed=cfg.run.seed + 1, step=s) for s in range(4)} != {
        draw_term_set(cfg.matryoshka.dims, 4, 64, seed=cfg.run.seed, step=s) for s in range(4)
    }

    batch = make_batch(built)
    task.begin_step(5)
    term_set = task.term_set()
    layer = min(t.layer for t in term_set.terms)
    dim = min(t.dim for t in term_set.terms)
    loss, metrics = task(batch)
    q, p = task.encode_pairs(batch, [layer, 4])
    rows_l, rows_4 = torch.cat([q[0], p[0]]), torch.cat([q[1], p[1]])
    # AngleTDMSETrainer.compute_loss with T = 1: T * KL between softmaxes of the embeddings themselves.
    kl = F.kl_div(F.log_softmax(rows_l, dim=-1), F.softmax(rows_4, dim=-1), reduction="batchmean")
    expected = (
        hand_info_nce(q[1], p[1], 64, 0.1)
        + hand_info_nce(q[1], p[1], dim, 0.1)
        + (hand_info_nce(q[0], p[0], 64, 0.1) + hand_info_nce(q[0], p[0], dim, 0.1)) / layer
        + kl
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    summary = task.summarize(metrics)
    assert sorted(k for k in summary if k.startswith("terms/")) == sorted(
        f"terms/layer{a}_dim{b}" for a in (layer, 4) for b in (dim, 64)
    )
    assert summary["drawn_layer"] == layer and summary["drawn_dim"] == dim and summary["kl_loss"] > 0


@pytest.mark.parametrize("layers", [[1, 2, 3, 4], [1, 2, 2, 3]])
def test_starbucks_sums_every_listed_pair_every_step_plus_kl_to_the_largest_pair(layers):
    dims = [8, 16, 32, 64]
    task, built, cfg = make_task(
        f"matryoshka.dims.dims={dims}", "matryoshka.dims.policy=starbucks", f"matryoshka.dims.layers={layers}"
    )
    term_sets = {draw_term_set(cfg.matryoshka.dims, 4, 64, seed=cfg.run.seed, step=s) for s in range(10)}
    assert len(term_sets) == 1  # a fixed list, no draws
    (term_set,) = term_sets
    pairs = list(zip(layers, dims, strict=True))
    assert [(t.layer, t.dim) for t in term_set.terms] == pairs
    assert term_set.kl_students == tuple(pairs[:-1])

    batch = make_batch(built)
    loss, metrics = task(batch)
    used = sorted(set(layers))
    q, p = task.encode_pairs(batch, used)

    def scores(layer: int, d: int) -> torch.Tensor:  # SrlDenseModel.forward: dot product of raw prefixes
        at = used.index(layer)
        return q[at][:, :d] @ p[at][:, :d].T

    def info_nce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits / 0.1, torch.arange(len(logits)))

    teacher = scores(layers[-1], 64)
    expected = info_nce(teacher) + sum(
        info_nce(scores(layer, d))
        + F.kl_div(
            F.log_softmax(scores(layer, d) / 0.1, dim=1),
            F.softmax(teacher.detach() / 0.1, dim=1),
            reduction="batchmean",
        )
        for layer, d in pairs[:-1]
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    summary = task.summarize(metrics)
    assert sorted(k for k in summary if k.startswith("terms/")) == sorted(
        f"terms/layer{layer}_dim{d}" for layer, d in pairs
    )


def with_negatives(built, batch: dict, rows: list[int]) -> dict:
    """The batch plus a hard negative for each sample in `rows` (texts, and one image), as the loader adds them."""
    import random

    from data_pipeline.pairs import PairSpec, collate_side, encode_side
    from data_pipeline.sample_data import draw_shape

    spec = PairSpec(built.tokenizer, built.image_token_id, built.visual_tokens, 96, 32)
    image = draw_shape("red", "square", random.Random(1))
    sides = [encode_side(spec, image if i == rows[0] else None, f"not this one {i}") for i in rows]
    collated = collate_side(sides, built.tokenizer.pad_token_id, 32, built.image_processor)
    rows_of_batch = len(batch["keys"])
    return {
        **batch,
        **{f"negative_{name}": value for name, value in collated.items()},
        "negative_rows": [i in rows for i in range(rows_of_batch)],
    }


def hand_info_nce_with_negatives(q, p, n, k: int, temperature: float) -> torch.Tensor:
    """Query i scores positive i against every positive and every hard negative."""
    q, p, n = (F.normalize(x[:, :k], dim=1) for x in (q, p, n))
    logits = torch.cat([q @ p.T, q @ n.T], dim=1) / temperature
    return -(logits.diagonal() - logits.logsumexp(dim=1)).mean()


def test_hard_negatives_are_extra_candidates_of_every_query():
    dims = [8, 64]
    task, built, _ = make_task(f"matryoshka.dims.dims={dims}")
    batch = make_batch(built)
    plain, _ = task(batch)
    negated = with_negatives(built, batch, rows=[0, 2, 3])
    loss, metrics = task(negated)
    q, p, n = task.encode_sides(negated, [4], ("query", "positive", "negative"))
    assert n.shape[1] == 3
    expected = sum(hand_info_nce_with_negatives(q[0], p[0], n[0], k, 0.1) for k in dims)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert loss > plain + 1e-4  # more candidates to tell apart: the same embeddings score a higher loss
    # Queries and positives embed as without negatives (one forward, rows independent).
    q_plain, p_plain = task.encode_pairs(batch, [4])
    torch.testing.assert_close(q, q_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p, p_plain, rtol=1e-5, atol=1e-5)
    # A negative side of zero rows (what the loader sends when no sample has one) changes nothing.
    empty = with_negatives(built, batch, rows=[0])
    empty.update(
        negative_input_ids=empty["negative_input_ids"][:0],
        negative_attention_mask=empty["negative_attention_mask"][:0],
        negative_pixel_values=empty["negative_pixel_values"][:0],
        negative_row_tokens=[],
        negative_row_images=[],
        negative_rows=[False] * 6,
    )
    torch.testing.assert_close(task(empty)[0], plain, rtol=1e-6, atol=1e-6)


# ── GradCache ─────────────────────────────────────────────────────────────────────────────────
class ActivationMeter:
    """Elements autograd saves for backward (parameters excluded), peak between backward calls."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.live = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in self.parameter_storages:
            self.live += tensor.numel()
            self.peak = max(self.peak, self.live)
        return tensor

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.live = 0  # the graph, and everything it saved, is freed by backward

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def direct_step(task, batch):
    meter = ActivationMeter(task)
    with meter.hooks():
        loss, _ = task(batch)
        meter.backward(loss)
    return loss.detach(), meter.peak


def grads_of(trained) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in trained}


def assert_same_grads(trained, expected: dict[str, torch.Tensor]) -> None:
    for name, param in trained:
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gradcache_matches_direct_path_and_holds_one_chunk_of_activations():
    task, built, _ = make_task(
        "matryoshka.dims.dims=[8,32,64]",
        "model.lora.enabled=true",
        "model.lora.dropout=0.1",
        "model.freeze.language_model=true",
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in task.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    batch = make_batch(built, rows=8)
    trained = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    assert len(trained) > 10
    task.train()

    # One chunk of the whole batch with LoRA dropout on: the replay must redraw the no-grad pass's
    # dropout masks (and those equal the direct pass's, drawn from the same seed).
    torch.manual_seed(7)
    direct_loss, _ = direct_step(task, batch)
    expected = grads_of(trained)
    task.zero_grad()
    task.chunk_size = 8
    torch.manual_seed(7)
    cached_loss, _ = task.forward_backward(batch, forward=task, backward=lambda loss: loss.backward())
    torch.testing.assert_close(cached_loss, direct_loss, rtol=1e-5, atol=1e-5)
    assert_same_grads(trained, expected)

    # Chunks of 2 (dropout off: smaller forwards draw other masks than one big one).
    for module in task.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    task.zero_grad()
    task.chunk_size = 0
    direct_loss, direct_peak = direct_step(task, batch)
    expected = grads_of(trained)
    task.zero_grad()
    task.chunk_size = 2
    meter = ActivationMeter(task)
    with meter.hooks():
        cached_loss, _ = task.forward_backward(batch, forward=task, backward=meter.backward)
    torch.testing.assert_close(cached_loss, direct_loss, rtol=1e-5, atol=1e-5)
    assert_same_grads(trained, expected)

    # Peak saved activations: GradCache at chunk 2 of 8 is about a direct step of 2 rows, not of 8.
    task.zero_grad()
    task.chunk_size = 0
    _, direct_peak_2 = direct_step(task, make_batch(built, rows=2))
    assert meter.peak < 1.3 * direct_peak_2, (meter.peak, direct_peak_2)
    assert direct_peak > 3 * meter.peak, (direct_peak, meter.peak)

    # With hard negatives (on samples 1, 4 and 5: chunks hold 0, 1 or 2 of them).
    negated = with_negatives(built, batch, rows=[1, 4, 5])
    task.zero_grad()
    task.chunk_size = 0
    direct_loss, _ = direct_step(task, negated)
    expected = grads_of(trained)
    task.zero_grad()
    task.chunk_size = 2
    cached_loss, _ = task.forward_backward(negated, forward=task, backward=lambda loss: loss.backward())
    torch.testing.assert_close(cached_loss, direct_loss, rtol=1e-5, atol=1e-5)
    assert_same_grads(trained, expected)
    print(
        f"saved activation elements: direct 8 rows {direct_peak}, GradCache chunk 2 {meter.peak}, direct 2 rows {direct_peak_2}"
    )


# ── embedding API ─────────────────────────────────────────────────────────────────────────────
def test_embed_api_truncates_and_round_trips_through_an_export_with_a_projection(tmp_path):
    from PIL import Image

    from mtrain.embed import Embedder, save_embedding_head
    from mtrain.engine.data import pair_spec

    task, built, cfg = make_task(
        "task.contrastive.projection_dim=32",
        "matryoshka.dims.dims=[8,16,32]",
        "matryoshka.dims.policy=2dmse",
        "matryoshka.dims.layers=[2,3]",
        "checkpoint.export_at_end=false",
    )
    embedder = Embedder(task, pair_spec(cfg, built), built.image_processor)
    image = Image.new("RGB", (40, 40), (200, 20, 20))
    inputs = [image, "a red circle.", (image, "what is <image> showing?")]
    full = embedder.embed(inputs, layer=3)
    assert full.shape == (3, 32)
    small = embedder.embed(inputs, dim=8, layer=3)
    torch.testing.assert_close(small, F.normalize(full[:, :8], dim=1))
    assert not torch.allclose(embedder.embed(inputs, dim=8), small)  # the last layer differs from layer 3
    with pytest.raises(ValueError, match="outside 1..4"):
        embedder.embed(inputs, layer=5)

    built.model.save_pretrained(tmp_path / "model")
    built.tokenizer.save_pretrained(tmp_path / "model")
    built.image_processor.save_pretrained(tmp_path / "model")
    save_embedding_head(task, tmp_path)
    exported = Embedder.from_export(tmp_path)
    assert exported.metadata["dims"] == [8, 16, 32] and exported.metadata["layers"] == [2, 3, 4]
    assert exported.metadata["projection_dim"] == 32
    torch.testing.assert_close(exported.embed(inputs, dim=16, layer=2), embedder.embed(inputs, dim=16, layer=2))

    # mtrain.infer on the same folder (stock transformers, the projection head from the export): the
    # checkpoint's embeddings at every trained layer and dim.
    import json

    from data_pipeline.pairs import collate_side, encode_side
    from mtrain.checkpoint.export import EXPORT_METADATA, matryoshka_metadata
    from mtrain.infer import MatryoshkaModel

    (tmp_path / EXPORT_METADATA).write_text(json.dumps({"matryoshka": matryoshka_metadata(cfg)}))
    stock = MatryoshkaModel.from_export(tmp_path)
    sides = [encode_side(embedder.spec, image, "", ""), encode_side(embedder.spec, None, "a red circle."),
             encode_side(embedder.spec, image, "what is <image> showing?")]  # fmt: skip
    batch = collate_side(sides, built.tokenizer.pad_token_id, embedder.spec.image_size, built.image_processor)
    for layer in (2, 3, 4):
        for dim in (8, 16, 32):
            got = stock.embed(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], dim=dim, layer=layer)
            torch.testing.assert_close(got, embedder.embed(inputs, dim=dim, layer=layer), rtol=1e-5, atol=1e-5)


# ── MRL-E ─────────────────────────────────────────────────────────────────────────────────────
def test_mrl_e_classifier_trains_from_config_and_round_trips_through_the_export(tmp_path):
    from PIL import Image

    from mtrain.embed import Embedder, save_embedding_head
    from mtrain.engine.data import pair_spec

    dims = [8, 16, 64]
    task, built, cfg = make_task(
        f"matryoshka.dims.dims={dims}", "matryoshka.dims.classes=3", "matryoshka.dims.classifier_weight=0.5"
    )
    with pytest.raises(ConfigError, match="GradCache replays only"):
        load_config(None, ["task.objective=contrastive", "matryoshka.dims.classes=3", "task.contrastive.chunk_size=2"])
    batch = make_batch(built)
    with pytest.raises(ValueError, match="KEY.label.cls"):
        task(batch)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    batch["labels"] = labels
    loss, metrics = task(batch)
    q, p = task.encode_pairs(batch, [4])
    w, b = task.classifier.weight, task.classifier.bias
    # MRL_Linear_Layer(efficient=True): logits_k = x[:, :k] W[:, :k]^T + b, a cross-entropy per k, summed.
    classifier = sum(F.cross_entropy(q[0][:, :k] @ w[:, :k].T + b, labels) for k in dims)
    expected = sum(hand_info_nce(q[0], p[0], k, 0.1) for k in dims) + 0.5 * classifier
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert task.summarize(metrics)["classifier_loss"] == pytest.approx(float(classifier.detach()), rel=1e-5)
    loss.backward()
    assert w.grad[:, 16:].abs().sum() > 0 and w.grad[:, :8].abs().sum() > 0

    built.model.save_pretrained(tmp_path / "model")
    built.tokenizer.save_pretrained(tmp_path / "model")
    built.image_processor.save_pretrained(tmp_path / "model")
    save_embedding_head(task, tmp_path)
    exported = Embedder.from_export(tmp_path)
    assert exported.metadata["classes"] == 3
    inputs = [Image.new("RGB", (40, 40), (200, 20, 20)), "a red circle."]
    ours = Embedder(task, pair_spec(cfg, built), built.image_processor)
    for k in dims:
        torch.testing.assert_close(exported.classify(inputs, dim=k), ours.classify(inputs, dim=k))
    with pytest.raises(ValueError, match="not a trained dim"):
        exported.classify(inputs, dim=32)
