"""mtrain_varlen_sdpa: packed rows attend causally within each document through sdpa's causal kernel per
document, with the same loss and gradients as sdpa under transformers' block-diagonal mask; anything else
(padding) is stock sdpa, bitwise; `auto` picks it on the CPU for packed rows of a plain-causal family."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from mtrain.config import load_config
from mtrain.model import varlen_attention
from mtrain.model.build import attention_implementation, build_model, family_attention
from mtrain.model.families import family_for
from mtrain.model.varlen_attention import VARLEN_SDPA, register_varlen_sdpa
from mtrain.task.registry import build_task
from tests.family_checks import documents, lora_task, m3_lora_config, packed_batch, padded_batch
from tests.unit.test_matryoshka_task import make_batch

QWEN_SCALES = [1, 4, 16]


def use_attention(task, name: str) -> None:
    """Every config of the task's model (the language model's, the vision tower's) set to attention `name`:
    transformers reads it at every forward, so the same weights run either way."""
    register_varlen_sdpa()
    for module in task.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


def loss_and_grads(task, batch: dict, attention: str) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    use_attention(task, attention)
    loss, _ = task(batch)
    trainable = [p for p in task.parameters() if p.requires_grad]
    return loss.detach(), list(torch.autograd.grad(loss, trainable, allow_unused=True))


@contextlib.contextmanager
def per_document_path_taken() -> Iterator[None]:
    """Inside: at least one mask is recognised as packed documents (a row of two or more), or the check fails:
    an equality with stock sdpa proves nothing if the varlen path never ran."""
    spans_taken = []
    original = varlen_attention.document_spans

    def recorded(starts):
        spans_taken.append(original(starts))
        return spans_taken[-1]

    varlen_attention.document_spans = recorded
    try:
        yield
    finally:
        varlen_attention.document_spans = original
    assert any(len(row) > 1 for spans in spans_taken for row in spans), "the per-document path never ran"


def assert_varlen_equals_block_diagonal_sdpa(task, batch: dict) -> None:
    """The packed `batch` through mtrain_varlen_sdpa (its per-document path taken) gives sdpa's loss and gradients."""
    with per_document_path_taken():
        loss, grads = loss_and_grads(task, batch, VARLEN_SDPA)
    want_loss, want_grads = loss_and_grads(task, batch, "sdpa")
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, want_grads, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def llava_m3():
    cfg = load_config(
        None,
        [
            "matryoshka.tokens.mode=m3",
            "matryoshka.tokens.scales=[1,4,16,64]",
            "matryoshka.tokens.layout=packed",
            "model.lora.enabled=true",
            "model.lora.dropout=0.0",
            "model.freeze.always_train=[lm_head]",
            f"model.attn_implementation={VARLEN_SDPA}",
        ],
    )
    return lora_task(cfg)


def test_packed_m3_one_pass_equals_the_block_diagonal_mask_llava(llava_m3):
    task, built = llava_m3
    assert built.model.config.text_config._attn_implementation == VARLEN_SDPA
    assert_varlen_equals_block_diagonal_sdpa(task, make_batch(built))


def test_packed_m3_one_pass_equals_the_block_diagonal_mask_qwen2_vl_mrope():
    from tests.unit.test_qwen2_vl_family import padded_batch as qwen_padded_batch  # noqa: PLC0415

    task, built = lora_task(
        m3_lora_config(
            "tiny-qwen2-vl",
            QWEN_SCALES,
            "model.lora.strategy=shared_plus_per_scale",
            f"model.attn_implementation={VARLEN_SDPA}",
        )
    )
    docs = documents(built, "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
    assert_varlen_equals_block_diagonal_sdpa(task, qwen_padded_batch(built, docs))


def lm_task():
    cfg = load_config(
        None, ["model.freeze.language_model=false", "data.packing=true", f"model.attn_implementation={VARLEN_SDPA}"]
    )
    built = build_model(cfg.model, torch.float32, None, seed=0, tokens=cfg.matryoshka.tokens)
    return build_task(cfg, built, rank=0), built


def test_packed_language_modeling_equals_the_block_diagonal_mask_and_a_leak_fails():
    task, built = lm_task()
    docs = documents(built, "", "", "", "")
    images = torch.randn(sum(n for _, _, n in docs), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = packed_batch(docs, images)
    assert_varlen_equals_block_diagonal_sdpa(task, batch)
    # The mutation the check must catch: one span per row, i.e. attention across documents.
    original = varlen_attention.document_spans
    varlen_attention.document_spans = lambda starts: [[(0, starts.shape[1])] for _ in range(starts.shape[0])]
    try:
        leaked, _ = loss_and_grads(task, batch, VARLEN_SDPA)
    finally:
        varlen_attention.document_spans = original
    blocked, _ = loss_and_grads(task, batch, "sdpa")
    assert (leaked - blocked).abs() > 1e-4


def test_padded_rows_run_stock_sdpa_bitwise():
    task, built = lm_task()
    docs = documents(built, "", "", "", "")
    images = torch.randn(sum(n for _, _, n in docs), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = padded_batch(built, docs, images)
    assert batch["attention_mask"].min() == 0  # real padding: the 2-D mask path
    loss, grads = loss_and_grads(task, batch, VARLEN_SDPA)
    want_loss, want_grads = loss_and_grads(task, batch, "sdpa")
    assert torch.equal(loss, want_loss)
    assert all(torch.equal(g, w) for g, w in zip(grads, want_grads, strict=True) if w is not None)


def test_grouped_query_attention_of_a_packed_row_equals_the_block_diagonal_mask():
    """A Llama language model with 2 key/value heads for 4 query heads, two packed rows of uneven documents."""
    from transformers import LlamaConfig, LlamaModel  # noqa: PLC0415

    register_varlen_sdpa()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaModel(config)
    embeds = torch.randn(2, 12, 32, requires_grad=True)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
    outputs = {}
    for name in (VARLEN_SDPA, "sdpa"):
        config._attn_implementation = name
        with per_document_path_taken() if name == VARLEN_SDPA else contextlib.nullcontext():
            hidden = model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        outputs[name] = (hidden, torch.autograd.grad(hidden.square().sum(), embeds)[0])
    for got, want in zip(outputs[VARLEN_SDPA], outputs["sdpa"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_varlen_is_chosen_by_name_for_plain_causal_families_only():
    if not torch.cuda.is_available():
        assert attention_implementation("auto") == "sdpa"  # the default stays stock sdpa
    assert attention_implementation(VARLEN_SDPA) == VARLEN_SDPA  # by name, anywhere
    for model_type in ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        assert family_attention(family_for(model_type), VARLEN_SDPA) == VARLEN_SDPA
    assert family_attention(family_for("gemma3"), VARLEN_SDPA) == "sdpa"  # bidirectional image blocks
    assert load_config(None, [f"model.attn_implementation={VARLEN_SDPA}"]).model.attn_implementation == VARLEN_SDPA
