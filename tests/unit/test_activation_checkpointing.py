"""Activation checkpointing: the same loss and gradients as without it, and fewer saved activations.

Saved activations are counted with `torch.autograd.graph.saved_tensors_hooks`: every tensor autograd
keeps for the backward passes through the pack hook, except those a checkpointed layer would keep
(non-reentrant checkpointing installs its own hooks inside the layer and drops them).
"""

from __future__ import annotations

import pytest
import torch

from mtrain.config import load_config
from mtrain.engine.setup import build_task
from mtrain.model.build import build_model
from tests.unit.test_contrastive import make_batch as pair_batch
from tests.unit.test_matryoshka_task import make_batch as caption_batch

OBJECTIVES = {
    # M3 at all scales in one packed row, Llama-MTSK MSS adapters on the frozen LM (the embeddings are
    # frozen, so no input of a checkpointed layer requires grad), with LoRA dropout: the recomputed
    # forward must draw the same dropout masks and see the same scale routing.
    "m3_mss_lora": [
        "matryoshka.tokens.mode=m3",
        "matryoshka.tokens.scales=[1,4,16,64]",
        "model.lora.enabled=true",
        "model.lora.strategy=shared_plus_per_scale",
        "model.lora.dropout=0.1",
    ],
    # Full fine-tune of the LM on captions.
    "lm_full": ["model.freeze.language_model=false"],
    # Contrastive with GradCache chunks and MRL dims: the replay pass recomputes inside checkpoints.
    "contrastive_gradcache": [
        "task.objective=contrastive",
        "model.freeze.language_model=false",
        "task.contrastive.chunk_size=2",
        "matryoshka.dims.dims=[16,64]",
    ],
}


def step(objective: str, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and the elements autograd saved in the forward, for one step."""
    overrides = [*OBJECTIVES[objective], f"model.activation_checkpointing={str(checkpointing).lower()}"]
    cfg = load_config(None, overrides)
    built = build_model(cfg.model, torch.float32, None, seed=0, tokens=cfg.matryoshka.tokens)
    task = build_task(cfg, built, rank=0).train()
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a delta so their routing matters
        for name, param in task.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    batch = pair_batch(built) if cfg.task.objective == "contrastive" else caption_batch(built)
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel()
        return tensor

    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = task(batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in task.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads, saved


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_checkpointing_keeps_loss_and_gradients_and_saves_less(objective):
    loss, grads, saved = step(objective, checkpointing=False)
    loss_ckpt, grads_ckpt, saved_ckpt = step(objective, checkpointing=True)

    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    if objective == "m3_mss_lora":
        assert any("scale_64" in name for name in grads)  # the scale adapters train
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved_ckpt < 0.6 * saved, (saved_ckpt, saved)


def test_checkpointing_is_off_by_default_and_switches_the_layers():
    cfg = load_config(None, ["model.activation_checkpointing=true"])
    built = build_model(cfg.model, torch.float32, None, seed=0)
    layers = built.model.model.language_model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert load_config(None, []).model.activation_checkpointing is False
