"""Every objective's step is device-true and makes no host sync.

Device: the model and the batch are built on the CPU, then the step runs with
`torch.set_default_device("meta")` in force. A tensor the step makes without naming a device
then lands on "meta", and any op mixing it with the CPU data fails (a CUDA run would mix CPU
and CUDA tensors the same way). The result must also stay on the data's device.

Host syncs: `.item()`, `.tolist()`, `float(tensor)`, `int(tensor)` and `bool(tensor)` called
from mtrain or data_pipeline code during a step are counted (on a GPU each waits for the
device); a step that does not log must make none.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from data_pipeline.packing import collate_rows
from data_pipeline.tokenize import IGNORE_INDEX, TokenizedSample
from mtrain.config import load_config
from mtrain.model.build import build_model
from mtrain.task.base import TokenNorm
from mtrain.task.registry import build_task

ROOT = Path(__file__).resolve().parents[2]
OUR_CODE = (str(ROOT / "mtrain"), str(ROOT / "data_pipeline"))

OBJECTIVES = {
    "lm_packed": [],
    "m3_all_scales_mss_lora": [
        "matryoshka.tokens.mode=m3",
        "matryoshka.tokens.scales=[1,4,16,64]",
        "model.lora.enabled=true",
        "model.lora.strategy=shared_plus_per_scale",
    ],
    "m3_padded_per_scale_lora": [
        "matryoshka.tokens.mode=m3",
        "matryoshka.tokens.scales=[4,64]",
        "matryoshka.tokens.layout=padded",
        "model.lora.enabled=true",
        "model.lora.strategy=per_scale",
    ],
    "mqt": ["matryoshka.tokens.mode=mqt", "matryoshka.tokens.scales=[2,8,32,64]"],
    "mqt_llava_sample_per_step": [
        "matryoshka.tokens.mode=mqt",
        "matryoshka.tokens.mqt_queries=16",
        "matryoshka.tokens.mqt_architecture=mqt_llava",
        "matryoshka.tokens.policy=sample_per_step",
    ],
    "contrastive_gradcache_mrl": [
        "task.objective=contrastive",
        "model.freeze.language_model=false",
        "matryoshka.dims.dims=[8,32,64]",
        "task.contrastive.chunk_size=2",
    ],
    "contrastive_2dmse": [
        "task.objective=contrastive",
        "model.tiny.num_layers=3",
        "matryoshka.dims.policy=2dmse",
        "matryoshka.dims.dims=[8,64]",
    ],
    "contrastive_starbucks": [
        "task.objective=contrastive",
        "model.tiny.num_layers=3",
        "matryoshka.dims.policy=starbucks",
        "matryoshka.dims.dims=[8,32,64]",
        "matryoshka.dims.layers=[1,2,3]",
    ],
}


def build(overrides: list[str]):
    cfg = load_config(None, ["model.lora.dropout=0.0", *overrides])
    torch.manual_seed(0)
    built = build_model(cfg.model, torch.float32, None, seed=0, tokens=cfg.matryoshka.tokens)
    task = build_task(cfg, built, rank=0)
    with torch.no_grad():
        for name, param in task.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # LoRA B starts at zero: give the adapters something to route
    return cfg, built, task.train()


def document(built, key: str, text: str, images: int) -> TokenizedSample:
    tokenizer, n = built.tokenizer, built.visual_tokens
    caption = tokenizer(text).input_ids
    ids = [tokenizer.bos_token_id] + [built.image_token_id] * (n * images) + caption
    labels = [IGNORE_INDEX] * (1 + n * images) + caption
    spans = [(1 + i * n, 1 + (i + 1) * n) for i in range(images)]
    sample = TokenizedSample(key, ids, labels, spans, [])
    sample.pixel_values = [torch.randn(3, 32, 32) for _ in range(images)]
    return sample


def packed_batch(built) -> dict:
    """Two packed rows: one of two documents (an image each), one of a text-only and an image document."""
    rows = [
        [document(built, "a", "a red circle.", 1), document(built, "b", "a blue square shape.", 1)],
        [document(built, "c", "no image here at all.", 0), document(built, "d", "a green cross.", 1)],
    ]
    return collate_rows(rows, built.tokenizer.pad_token_id, packed=True)


def pair_batch(built) -> dict:
    import random

    from data_pipeline.pairs import PairSpec, collate_pairs, encode_side
    from data_pipeline.sample_data import draw_shape

    rng = random.Random(0)
    spec = PairSpec(built.tokenizer, built.image_token_id, built.visual_tokens, 96, 32)
    samples = [
        {
            "key": str(row),
            # Rows 0 and 2 hold an image: chunks of 2 then hold different image counts.
            "query": encode_side(spec, draw_shape("red", "circle", rng) if row % 2 == 0 else None, f"q {row}", "Find"),
            "positive": encode_side(spec, None, f"a red circle number {row}."),
        }
        for row in range(4)
    ]
    from tests.unit.test_contrastive import with_negatives

    # Hard negatives on rows 1 and 2 (one with an image): the negative path is device-true too.
    return with_negatives(built, collate_pairs(samples, spec, built.image_processor), rows=[1, 2])


def batch_for(cfg, built) -> dict:
    return pair_batch(built) if cfg.task.objective == "contrastive" else packed_batch(built)


def step(task, batch: dict) -> torch.Tensor:
    """One training micro-step of the task, the way the trainer runs it: token losses over the step's counts."""
    counts = task.learned_tokens(batch)
    task.token_norm = None if counts is None else TokenNorm(counts, divisor=1.0)  # one rank, one micro-batch
    loss, metrics = task.forward_backward(batch, forward=task, backward=lambda out: out.backward())
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.device.type == "cpu", f"metric {name}: {value!r}"
    return loss


def step_on_meta(task, batch) -> torch.Tensor:
    """One step with "meta" as the default device: a tensor made without an explicit device fails."""
    torch.set_default_device("meta")
    try:
        return step(task, batch)
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_step_makes_every_tensor_on_the_data_device(objective):
    cfg, built, task = build(OBJECTIVES[objective])
    batch = batch_for(cfg, built)
    loss = step_on_meta(task, batch)
    assert loss.device.type == "cpu" and torch.isfinite(loss)
    grads = [p.grad for p in task.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "cpu" for g in grads)


def test_evaluation_at_a_scale_is_device_true():
    cfg, built, task = build(OBJECTIVES["m3_all_scales_mss_lora"])
    batch = packed_batch(built)
    torch.set_default_device("meta")
    try:
        stats = task.evaluate_scale(batch, 4)
    finally:
        torch.set_default_device(None)
    assert stats["answers"] == 2 and stats["tokens"] > 0


def test_embedding_is_device_true():
    """The embed API makes its batch on the host, moves it to the model, and embeds device-true."""
    from PIL import Image

    from data_pipeline.pairs import PairSpec
    from mtrain.embed import Embedder
    from mtrain.task.registry import retrieval_view

    cfg, built, task = build(OBJECTIVES["contrastive_gradcache_mrl"])
    spec = PairSpec(built.tokenizer, built.image_token_id, built.visual_tokens, 96, 32)
    embedder = Embedder(retrieval_view(cfg, built, task), spec, built.image_processor)
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    torch.set_default_device("meta")
    try:
        vectors = embedder.embed([image, "a red circle.", (image, "<image> what colour?")], dim=8)
    finally:
        torch.set_default_device(None)
    assert vectors.shape == (3, 8) and vectors.device.type == "cpu"
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))


# ── host syncs ────────────────────────────────────────────────────────────────────────────────
@contextlib.contextmanager
def counted_host_syncs() -> Iterator[list[str]]:
    """Count tensor-to-host reads whose caller is mtrain or data_pipeline code (not torch's or HF's)."""
    calls: list[str] = []
    # nonzero: its result's size is read from the device (the learned positions' selection, sized without it).
    names = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "nonzero")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name: str):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OUR_CODE):
                calls.append(f"{name} at {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return wrapper

    for name in names:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_a_step_makes_no_host_sync(objective):
    cfg, built, task = build(OBJECTIVES[objective])
    batch = batch_for(cfg, built)
    step(task, batch)  # a first step, so lazily built state does not count
    task.zero_grad()
    with counted_host_syncs() as calls:
        step(task, batch)
    assert calls == []
