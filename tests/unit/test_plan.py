"""`mtrain plan`: every figure checked against hand-computed ones, for the tiny preset and LLaVA-1.5-7B shapes."""

from __future__ import annotations

import dataclasses
import math

import pytest

from mtrain.cli import main
from mtrain.config import load_config
from mtrain.config.deepspeed_json import BUCKET_FLOOR
from mtrain.metrics.flops import lm_flops_per_token, sample_flops
from mtrain.metrics.plan import (
    GIB,
    H100,
    LLAVA15_7B,
    LLAVA15_RUN,
    Cluster,
    deepspeed_model_states_estimate,
    make_plan,
    parse_memory,
    plan_memory,
)
from tests.conftest import REPO

MODELS = REPO / "configs/models"  # public config.json files of full-size models (no weights)

M3 = ["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16,64]"]


def test_tiny_preset_plan_matches_hand_computation():
    cfg = load_config(REPO / "configs/tiny.yaml", M3)
    plan = make_plan(cfg, Cluster(1, 2, 80 * GIB))
    shape = plan.shape

    # Parameters from the tiny shapes: LM hidden 64, 2 layers, MLP 128, vocab 512; CLIP 32 wide, 2 layers,
    # MLP 64, 32 px / patch 4 (64 patches + CLS); projector 32 -> 64 -> 64.
    layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64
    lm_matmul = 2 * layer + 64 + 512 * 64  # layers, final norm, lm_head (the input embedding is a lookup)
    vision = (
        (32 + 3 * 4 * 4 * 32 + 65 * 32) + 64 + 2 * (4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 4 * 32) + 64
    )
    projector = 32 * 64 + 64 + 64 * 64 + 64
    lora = 2 * 2 * (8 * 64 + 64 * 8)  # r=8 on q_proj and v_proj of 2 layers
    trained_copies = 512 * 64 + projector  # PEFT modules_to_save: lm_head and projector train as copies
    assert (shape.lm_params, shape.vision_params, shape.projector_params) == (lm_matmul, vision, projector)
    assert shape.total_params == 512 * 64 + lm_matmul + vision + projector + lora + trained_copies == 218_048
    assert shape.trainable_params == lora + trained_copies == 43_136
    assert shape.lm_trained_params == 512 * 64  # only lm_head's copy among the base weights
    assert shape.largest_layer_params == 512 * 64
    assert (shape.vision_trained, shape.projector_trained) == (False, True)

    # Memory per GPU on 2 GPUs.
    memory = plan.memory
    assert memory.parameters == 2 * 218_048 / 2
    assert memory.gradients == 4 * 43_136 / 2
    assert memory.optimizer == 12 * 43_136 / 2
    assert memory.gathered_layer == 4 * 512 * 64
    assert memory.buffers == 2 * (2 * BUCKET_FLOOR)  # reduce and prefetch buckets: h = 64 puts both at the floor
    # Text fills max_len 96 after the 64-token grid: 32 tokens, repeated at each of the 4 scales (packed row).
    row = 4 * 32 + (1 + 4 + 16 + 64)
    per_token = 2 * (6 * 64 + 2 * 64 + 4 * 128) * 2 + 2 * 2 * 64 + 10 * 512
    assert memory.activations_per_sample == row * per_token + 64 * 2 * (32 + 2 * 64)
    free = 80 * GIB * 0.9 - memory.model_states - memory.buffers
    assert memory.max_micro_batch == math.floor(free / memory.activations_per_sample)

    # Tokens per step: micro-batch 8 x accum 1 x 2 GPUs samples of 213 LM tokens.
    assert plan.tokens.lm_tokens_per_sample == row == 213
    assert plan.tokens.samples_per_step == 16
    assert plan.tokens.tokens_per_step == 213 * 16
    assert plan.tokens.visual_per_scale == {1: 1, 4: 4, 16: 16, 64: 64}

    # FLOPs of one sample: dense LM (4N + 2N_trained), causal attention per segment, frozen vision
    # (forward only), trained projector (forward + weight gradients).
    dense = 4 * lm_matmul + 2 * 512 * 64
    attention = sum(6 * 2 * 64 * (32 + s) ** 2 for s in (1, 4, 16, 64))
    tower = 2 * vision * 65 + 4 * 2 * 32 * 65**2
    expected = row * dense + attention + tower + 2 * (2 * projector * 64)
    assert plan.projection.flops_per_sample == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope="module")
def llava7b_dir(tmp_path_factory):
    """A LLaVA-1.5-7B config.json (CLIP ViT-L/14-336 + Vicuna-7B shapes); no weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    folder = tmp_path_factory.mktemp("llava-1.5-7b")
    LlavaConfig(text_config=text, vision_config=vision, image_token_id=32000, vision_feature_layer=-2).save_pretrained(
        folder
    )
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    return folder


def full_finetune_7b(folder) -> list[str]:
    return [
        "model.preset=none",
        f"model.path={folder}",
        "model.lora.enabled=false",
        "model.freeze.language_model=false",
        "model.freeze.always_train=[]",
        "matryoshka.tokens.mode=m3",
        "matryoshka.tokens.scales=[1,9,36,144,576]",
        "data.max_len=2048",
        "data.micro_batch_size=4",
    ]


def test_llava_7b_plan_matches_hand_computation(llava7b_dir):
    cfg = load_config(REPO / "configs/tiny.yaml", full_finetune_7b(llava7b_dir))
    cluster = Cluster(1, 8, 80 * GIB)
    plan = make_plan(cfg, cluster, text_tokens=300)
    shape = plan.shape

    layers = 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)
    lm_matmul = layers + 4096 + 32064 * 4096
    vision = (
        (1024 + 3 * 14 * 14 * 1024 + 577 * 1024)
        + 2048
        + 24 * (4 * (1024**2 + 1024) + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024)
        + 2048
    )
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    total = 32064 * 4096 + lm_matmul + vision + projector
    assert (shape.lm_params, shape.vision_params, shape.projector_params) == (lm_matmul, vision, projector)
    assert shape.total_params == total == 7_063_427_072
    assert shape.trainable_params == total - vision  # the vision tower stays frozen
    assert shape.largest_layer_params == 32064 * 4096
    # The published-run constants are the same shapes at Vicuna's own vocabulary of 32000.
    assert LLAVA15_7B.lm_params == lm_matmul - 64 * 4096
    assert (LLAVA15_7B.vision_params, LLAVA15_7B.projector_params) == (vision, projector)
    assert LLAVA15_7B.total_params == total - 2 * 64 * 4096

    memory = plan.memory
    trained = total - vision
    assert (memory.persistence_threshold, memory.replicated_elements, memory.replicated) == (0, 0, 0)  # all sharded
    assert memory.buffers == 2 * (2 * BUCKET_FLOOR)  # h^2 = 1.7e7 is under the floor: DeepSpeed's 5e7 buckets
    assert memory.model_states == 2 * total / 8 + 16 * trained / 8 + 4 * 32064 * 4096
    assert 14.7 < memory.model_states / GIB < 14.8
    # Kept whole at HF's "auto" threshold 10 x 4096: the LM's 65 norms; per CLIP layer 2 layer norms and the
    # q/k/v/o, fc1 and fc2 biases; CLIP's pre/post norms and class embedding; the projector's 2 biases.
    whole = 65 * 4096 + 24 * (2 * 2048 + 4 * 1024 + 4096 + 1024) + 2 * 2048 + 1024 + 2 * 4096
    assert whole == 599_040
    hf_auto = make_plan(
        load_config(
            REPO / "configs/tiny.yaml", [*full_finetune_7b(llava7b_dir), "zero.param_persistence_threshold=40960"]
        ),
        cluster,
        text_tokens=300,
    ).memory
    assert (hf_auto.persistence_threshold, hf_auto.replicated_elements) == (40960, whole)
    assert hf_auto.replicated == 2 * whole * 7 / 8  # 1 MB: nothing at this size
    assert hf_auto.model_states == memory.model_states + 2 * whole * 7 / 8
    # Cross-check against DeepSpeed's own estimator where it applies (every parameter trained; it counts
    # no replicated parameters).
    all_trained = dataclasses.replace(shape, trainable_params=total)
    checked = plan_memory(cfg, all_trained, cluster, [[300 + s for s in (1, 9, 36, 144, 576)]], H100)
    ours = checked.model_states - checked.replicated
    assert ours == pytest.approx(deepspeed_model_states_estimate(total, 32064 * 4096, cluster, offload=False), abs=1)

    row = 5 * 300 + (1 + 9 + 36 + 144 + 576)
    assert plan.tokens.lm_tokens_per_sample == row == 2266
    assert plan.tokens.tokens_per_step == 2266 * 4 * 8
    per_token = 2 * (6 * 4096 + 2 * 4096 + 4 * 11008) * 32 + 4 * 4096 + 10 * 32064
    assert memory.activations_per_sample == row * per_token + 576 * 2 * (1024 + 2 * 4096)
    assert memory.max_micro_batch == 5  # 72 GiB usable - 14.9 GiB states and buffers = 57 GiB / 11.1 GiB

    # The projection, by hand: FLOPs of a micro-batch of 4, H100 at 0.65 x 0.60 of 989 TFLOPs,
    # ZeRO-3 moving 2 x 2 B x params + 2 B x trained over NVLink at 360 GB/s, 70% overlap.
    dense = 6 * lm_matmul  # the whole LM trains: 6N
    attention = sum(6 * 32 * 4096 * (300 + s) ** 2 for s in (1, 9, 36, 144, 576))
    image = 2 * vision * 577 + 4 * 24 * 1024 * 577**2 + 2 * (2 * projector * 576)
    flops = 4 * (row * dense + attention + image)
    compute_s = flops / (989e12 * 0.65 * 0.60)
    comm_s = (4 * total + 2 * trained) * 7 / 8 / 360e9
    step_s = max(compute_s, comm_s) + 0.3 * min(compute_s, comm_s)
    projection = plan.projection
    assert lm_flops_per_token(shape) == dense
    assert projection.compute_s == pytest.approx(compute_s, rel=1e-12)
    assert projection.comm_s == pytest.approx(comm_s, rel=1e-12)
    assert projection.mfu == pytest.approx(flops / (step_s * 989e12), rel=1e-12)
    assert projection.tokens_per_s == pytest.approx(8 * 4 * row / step_s, rel=1e-12)
    assert 0.37 < projection.mfu < 0.39  # compute-bound on one node: close to the 0.39 compute efficiency

    # Across 8 nodes the same traffic crosses 40 GB/s InfiniBand: communication-bound.
    wide = make_plan(cfg, Cluster(8, 8, 80 * GIB), text_tokens=300, shape=shape)
    assert wide.projection.comm_s == pytest.approx((4 * total + 2 * trained) * 63 / 64 / 40e9, rel=1e-12)
    assert wide.projection.comm_s > wide.projection.compute_s
    assert wide.projection.mfu < projection.mfu


def test_llava15_published_run_arithmetic():
    # 624,610 image conversations of 300 text + 576 visual tokens, 40,688 text-only ones of 300 tokens.
    n = LLAVA15_7B.lm_params
    with_image = 6 * n * 876 + 6 * 32 * 4096 * 876**2 + 2 * 303_507_456 * 577 + 4 * 24 * 1024 * 577**2
    with_image += 2 * 2 * LLAVA15_7B.projector_params * 576  # forward + weight gradients
    text_only = 6 * n * 300 + 6 * 32 * 4096 * 300**2
    flops = 624_610 * with_image + 40_688 * text_only
    assert sample_flops(LLAVA15_7B, [876]) == pytest.approx(with_image, rel=1e-12)
    assert LLAVA15_RUN.flops() == pytest.approx(flops, rel=1e-12)
    assert LLAVA15_RUN.mfu() == pytest.approx(flops / (8 * 312e12 * 36_000), rel=1e-12)
    assert 0.24 < LLAVA15_RUN.mfu() < 0.27  # the "about 25%" the issue quotes


def test_plan_cli_prints_figures_and_assumptions(llava7b_dir, capsys):
    overrides = full_finetune_7b(llava7b_dir)
    assert main(["plan", str(REPO / "configs/tiny.yaml"), *overrides, "--nodes", "8", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    for text in (
        "= 64 GPUs",
        "7,063,427,072",
        "largest micro-batch that fits:",
        "tokens per step",
        "projected MFU",
        "projected tokens/s",
        "989 TFLOPs",
        "40 GB/s per GPU",
        "LLaVA-1.5-7B fine-tune",
        "torchtitan",
    ):
        assert text in out, text


def test_parse_memory_and_bad_sizes(capsys):
    assert parse_memory("80GB") == parse_memory("80GiB") == parse_memory("80") == 80 * GIB
    assert parse_memory("40960MB") == 40 * GIB
    assert main(["plan", str(REPO / "configs/tiny.yaml"), "--gpu-mem", "lots"]) == 2
    assert "expected a size such as 80GB" in capsys.readouterr().err


# The global batch of each recipe's paper (LLaVA-1.5 stage 1, M3, Llama-MTSK, MQT-LLaVA, VLM2Vec).
RECIPE_GLOBAL_BATCH = {
    "pretrain_projector": 256,
    "continue_pretrain_interleaved": 128,
    "lora_sft_matryoshka": 128,
    "mqt_finetune": 128,
    "embedding_mrl": 256,
    "lora_sft_matryoshka_qwen2_5_vl": 128,
}


@pytest.mark.parametrize("recipe", sorted(RECIPE_GLOBAL_BATCH))
def test_every_full_size_recipe_fits_eight_80gb_gpus(llava7b_dir, recipe):
    folder = MODELS / "qwen2_5_vl_7b" if "qwen2_5_vl" in recipe else llava7b_dir  # the public config.json
    cfg = load_config(REPO / f"configs/recipes/{recipe}.yaml", [f"model.path={folder}"])
    cluster = Cluster(1, 8, 80 * GIB)
    # Text filling data.max_len is the longest row a step can meet; 300 text tokens the typical one.
    longest = make_plan(cfg, cluster)
    assert longest.tokens.text_per_sample == 2048 - longest.shape.visual_tokens
    for plan in (longest, make_plan(cfg, cluster, text_tokens=300, shape=longest.shape)):
        assert plan.memory.fits, (recipe, plan.memory.micro_batch, plan.memory.max_micro_batch)
        assert plan.memory.total + plan.memory.reserve <= 80 * GIB
        assert plan.tokens.samples_per_step == RECIPE_GLOBAL_BATCH[recipe]
    shipped = sorted(p.stem for p in (REPO / "configs/recipes").glob("*.yaml"))
    assert shipped == sorted(RECIPE_GLOBAL_BATCH)


QWEN_RECIPE = "lora_sft_matryoshka_qwen2_5_vl"


def test_qwen2_5_vl_7b_recipe_plans_the_published_architecture():
    """The Qwen recipe planned from the public Qwen2.5-VL-7B config.json shipped in configs/models (no weights)."""
    cfg = load_config(REPO / f"configs/recipes/{QWEN_RECIPE}.yaml", [f"model.path={MODELS / 'qwen2_5_vl_7b'}"])
    cluster = Cluster(1, 8, 80 * GIB)
    longest = make_plan(cfg, cluster)
    shape = longest.shape
    # PEFT keeps the trained patch merger twice (the base copy and modules_to_save's), so what is held and not
    # trained is the base model alone: Qwen2.5-VL-7B's published 8.29B.
    assert shape.total_params - shape.trainable_params == 8_292_166_656
    # LoRA r=32 on q_proj (3584 -> 3584) and v_proj (3584 -> 512, 4 kv heads) of 28 layers; shared + 5 scales,
    # plus the merger (freeze.projector=false).
    assert shape.trainable_params == 6 * 28 * 32 * ((3584 + 3584) + (3584 + 512)) + shape.projector_params
    # model.image_size 448 x 448 px: 32 x 32 patches of 14 px through the tower, 2 x 2 merged into 256 tokens.
    assert (shape.vision_sequence, shape.visual_tokens) == (1024, 256)
    assert (shape.vision_layers, shape.vision_hidden) == (32, 1280)
    assert not shape.vision_trained and shape.projector_trained
    assert longest.tokens.visual_per_scale == {1: 1, 4: 4, 16: 16, 64: 64, 256: 256}
    for plan in (longest, make_plan(cfg, cluster, text_tokens=300, shape=shape)):
        assert plan.memory.fits, (plan.memory.micro_batch, plan.memory.max_micro_batch)
        assert plan.memory.total + plan.memory.reserve < 80 * GIB  # the per-GPU figure `mtrain plan` prints
        assert plan.tokens.samples_per_step == 128
    assert longest.memory.total + longest.memory.reserve > 0.4 * 80 * GIB  # text filling max_len is a real load


def test_llava_onevision_7b_plans_anyres_crops():
    overrides = ["model.preset=none", f"model.path={MODELS / 'llava_onevision_7b'}", "model.lora.enabled=false",
                 "model.freeze.always_train=[]", "matryoshka.tokens.mode=none", "data.max_len=4096",
                 "data.micro_batch_size=1"]  # fmt: skip
    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    plan = make_plan(cfg, Cluster(1, 8, 80 * GIB), text_tokens=300)
    shape = plan.shape
    assert shape.total_params == 8_046_045_936  # Qwen2-7B (vocab 152,128) + SigLIP-so400m (26 layers) + projector
    # The projector (freeze.projector=false) and the learned image-newline token, which trains with it.
    assert shape.trainable_params == 1152 * 3584 + 3584 + 3584 * 3584 + 3584 + 3584
    # A 768 x 768 px image: 2 x 2 crops of 384 px plus the base image, 27 x 27 = 729 tokens each; the crops' 54 x 54
    # grid gets one image-newline token per row.
    assert (shape.vision_sequence, shape.grid_tokens, shape.vision_passes) == (729, 729, 5)
    assert shape.visual_tokens == 54 * 54 + 54 + 729
    one_pass = dataclasses.replace(shape, vision_passes=1)
    lm_only = sample_flops(dataclasses.replace(shape, vision_passes=0), [300 + 3699])
    assert sample_flops(shape, [300 + 3699]) - lm_only == pytest.approx(5 * (sample_flops(one_pass, [3999]) - lm_only))
    assert plan.memory.fits and plan.memory.total + plan.memory.reserve < 80 * GIB


def test_activation_checkpointing_and_offload_by_hand(llava7b_dir):
    base = [*full_finetune_7b(llava7b_dir), "zero.stage=3"]
    cluster = Cluster(1, 8, 80 * GIB)
    plain = make_plan(load_config(REPO / "configs/tiny.yaml", base), cluster, text_tokens=300)
    ckpt = make_plan(
        load_config(REPO / "configs/tiny.yaml", [*base, "model.activation_checkpointing=true"]),
        cluster,
        text_tokens=300,
        shape=plain.shape,
    )
    # Checkpointed: each of the 32 layers keeps its input (4096 per token), one layer is recomputed
    # at a time; final norm and logits as before.
    row = 5 * 300 + (1 + 9 + 36 + 144 + 576)
    layer = 6 * 4096 + 2 * 4096 + 4 * 11008
    per_token = 2 * (32 * 4096 + layer) + 4 * 4096 + 10 * 32064
    projector = 576 * 2 * (1024 + 2 * 4096)
    assert ckpt.memory.activations_per_sample == row * per_token + projector
    assert plain.memory.activations_per_sample == row * (2 * 32 * layer + 4 * 4096 + 10 * 32064) + projector
    assert ckpt.memory.model_states == plain.memory.model_states
    # The recomputed forward of the 32 layers costs time but is not a model FLOP.
    layers = 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)
    recompute = 4 * (2 * layers * row + sum(2 * 32 * 4096 * (300 + s) ** 2 for s in (1, 9, 36, 144, 576)))
    flops = 4 * plain.projection.flops_per_sample
    assert ckpt.projection.compute_s == pytest.approx((flops + recompute) / (989e12 * 0.39), rel=1e-12)
    assert ckpt.projection.flops_per_sample == plain.projection.flops_per_sample
    assert ckpt.projection.mfu < plain.projection.mfu

    # Offload: gradients and optimizer state leave the GPU; with parameters, the bf16 partitions too.
    offloaded = make_plan(
        load_config(REPO / "configs/tiny.yaml", [*base, "zero.offload_optimizer=cpu", "zero.offload_param=cpu"]),
        cluster,
        text_tokens=300,
        shape=plain.shape,
    )
    memory = offloaded.memory
    assert (memory.parameters, memory.gradients, memory.optimizer) == (0.0, 0.0, 0.0)
    assert memory.model_states == 4 * 32064 * 4096  # only the gathered largest layer stays
    total = plain.shape.total_params
    assert memory.deepspeed_estimate == deepspeed_model_states_estimate(
        total, 32064 * 4096, cluster, offload=True, offload_params=True
    )
    assert memory.deepspeed_estimate < plain.memory.deepspeed_estimate


def test_plan_counts_parameters_the_persistence_threshold_keeps_whole():
    """Parameters at or under zero.param_persistence_threshold are whole on every GPU (DeepSpeed's rule):
    at 0 nothing is, at a threshold above every parameter the whole model is."""
    cluster = Cluster(1, 2, 80 * GIB)

    def memory(threshold: int):
        return make_plan(load_config(REPO / "configs/tiny.yaml", [f"zero.param_persistence_threshold={threshold}"]),
                         cluster).memory  # fmt: skip

    none, every, sized = memory(0), memory(10**9), make_plan(load_config(REPO / "configs/tiny.yaml"), cluster).memory
    total = 218_048  # the tiny preset's parameters (test_tiny_preset_plan_matches_hand_computation)
    assert (none.replicated, none.replicated_elements) == (0.0, 0)
    assert every.replicated_elements == total
    assert every.parameters + every.replicated == 2 * total  # the whole bf16 model on each of the 2 GPUs
    assert every.model_states - none.model_states == 2 * total / 2
    # The sized default shards every parameter (threshold 0).
    assert (sized.persistence_threshold, sized.replicated_elements) == (0, 0)
