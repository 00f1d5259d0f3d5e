"""`mqt_architecture: mqt_llava` has MQT-LLaVA's Resampler layout and computes its forward.

The reference (gordonhu608/MQT-LLaVA llava/model/multimodal_projector/builder.py, `Resampler`
built by `build_matryoshka_query_transformer`) is re-written below from its code: parameter
names and shapes, the (column, row) sin-cos positions, and the forward.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtrain.config import ConfigError, load_config
from mtrain.model.token_scales import MQTLlavaResampler

VISION, TEXT, QUERIES, HEADS, PATCHES = 32, 48, 16, 4, 64


def reference_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """get_2d_sincos_pos_embed: meshgrid(grid_w, grid_h) ("w goes first"), emb_h from grid[0]."""

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    grid = grid.reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, matry_n: int) -> torch.Tensor:
    """Resampler.forward: seq-first attention of query[:m] + pos_embed[:m] on positions (keys) and features."""
    attn = torch.nn.MultiheadAttention(VISION, HEADS)
    attn.load_state_dict({k.removeprefix("attn."): v for k, v in state.items() if k.startswith("attn.")})
    ln = {}
    for name in ("ln_q", "ln_k", "ln_v"):
        ln[name] = torch.nn.LayerNorm(VISION, eps=1e-6)
        ln[name].load_state_dict({"weight": state[f"{name}.weight"], "bias": state[f"{name}.bias"]})
    src = int(math.sqrt(state["pos_embed"].size(0)))
    tgt = int(math.sqrt(x.shape[1]))
    pos_embed = (  # get_abs_pos
        F.interpolate(
            state["pos_embed"].float().reshape(1, src, src, -1).permute(0, 3, 1, 2),
            size=(tgt, tgt),
            mode="bicubic",
            align_corners=False,
        )
        .permute(0, 2, 3, 1)
        .flatten(0, 2)
    )
    x = x.permute(1, 0, 2)
    n = x.shape[1]

    def repeat(query: torch.Tensor) -> torch.Tensor:
        return query.unsqueeze(1).repeat(1, n, 1)

    q = repeat(state["query"][:matry_n])
    out = attn(ln["ln_q"](q + state["pos_embed"][:matry_n].unsqueeze(1)), ln["ln_k"](repeat(pos_embed)), ln["ln_v"](x))[
        0
    ]
    return out.permute(1, 0, 2) @ state["proj"]


def test_parameter_names_and_shapes_are_the_references():
    resampler = MQTLlavaResampler(VISION, TEXT, QUERIES, HEADS)
    shapes = {name: tuple(value.shape) for name, value in resampler.state_dict().items()}
    assert shapes == {
        "pos_embed": (QUERIES, VISION),
        "query": (QUERIES, VISION),
        "attn.in_proj_weight": (3 * VISION, VISION),
        "attn.in_proj_bias": (3 * VISION,),
        "attn.out_proj.weight": (VISION, VISION),
        "attn.out_proj.bias": (VISION,),
        "ln_q.weight": (VISION,),
        "ln_q.bias": (VISION,),
        "ln_k.weight": (VISION,),
        "ln_k.bias": (VISION,),
        "ln_v.weight": (VISION,),
        "ln_v.bias": (VISION,),
        "proj": (VISION, TEXT),
    }
    assert "pos_embed" not in dict(resampler.named_parameters())  # fixed, as the reference's
    torch.testing.assert_close(resampler.pos_embed, torch.from_numpy(reference_sincos(VISION, 4)).float())


def test_a_reference_state_dict_loads_and_gives_the_references_outputs():
    torch.manual_seed(0)
    state = {
        name: torch.randn_like(value)
        for name, value in MQTLlavaResampler(VISION, TEXT, QUERIES, HEADS).state_dict().items()
    }
    resampler = MQTLlavaResampler(VISION, TEXT, QUERIES, HEADS)
    resampler.load_state_dict(state, strict=True)
    features = torch.randn(3, PATCHES, VISION)
    ours = resampler(features)
    assert ours.shape == (3, QUERIES, TEXT)
    for matry_n in (2, 6, QUERIES):  # the caller keeps the first m outputs
        torch.testing.assert_close(ours[:, :matry_n], reference_forward(state, features, matry_n), rtol=1e-3, atol=1e-4)


def test_the_layout_trains_inside_a_tiny_llava():
    from mtrain.model.build import build_model
    from mtrain.task.registry import build_task
    from tests.unit.test_matryoshka_task import make_batch

    cfg = load_config(
        None,
        [
            "matryoshka.tokens.mode=mqt",
            "matryoshka.tokens.mqt_queries=16",
            "matryoshka.tokens.mqt_architecture=mqt_llava",
            "matryoshka.tokens.scales=[4,16]",
        ],
    )
    built = build_model(cfg.model, torch.float32, None, seed=0, tokens=cfg.matryoshka.tokens)
    projector = built.model.model.multi_modal_projector
    assert isinstance(projector, MQTLlavaResampler)
    task = build_task(cfg, built, rank=0)
    loss, _ = task(make_batch(built))
    loss.backward()
    assert projector.query.grad.abs().sum() > 0 and projector.proj.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="square grid"):
        load_config(
            None,
            [
                "matryoshka.tokens.mode=mqt",
                "matryoshka.tokens.mqt_queries=8",
                "matryoshka.tokens.mqt_architecture=mqt_llava",
            ],
        )
