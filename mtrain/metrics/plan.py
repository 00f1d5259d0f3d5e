"""`mtrain plan`: per-GPU memory, tokens per step and a GPU throughput projection, from the config alone.

The model is built on the meta device from its config (the preset, or `model.path`'s config.json),
so a 7B plan needs no weights and runs on a laptop. Everything assumed is printed with the figures.

Memory per GPU under ZeRO-3 with bf16 mixed precision (DeepSpeed's `estimate_zero3_model_states_mem_needs`,
which charges 18 bytes per parameter and assumes every parameter trains):

    parameters   2 B x all parameters / GPUs            (bf16 weights, sharded; 0 with zero.offload_param=cpu)
    gradients    4 B x trained parameters / GPUs        (fp32 gradient partition; 0 with zero.offload_optimizer=cpu)
    optimizer   12 B x trained parameters / GPUs        (fp32 master weights, Adam m and v; 0 offloaded)
    gathered     4 B x largest layer                    (a gathered layer's working set)
    replicated   2 B x elements of parameters <= the persistence threshold x (1 - 1/GPUs)
                                                        (kept whole on every GPU, beyond their shard)
    buffers      2 B x (reduce bucket + prefetch bucket)
    activations  per sample, with or without activation checkpointing (see `activation_bytes_per_sample`)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from mtrain.config.deepspeed_json import zero_sizes
from mtrain.config.schema import TrainConfig
from mtrain.metrics.flops import (
    ModelShape,
    attention_flops,
    lm_flops_per_token,
    mean_sample_flops,
    mean_sample_tokens,
    model_shape,
    sample_flops,
    sample_layouts,
)

GIB = 2**30


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_bytes: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class GpuAssumptions:
    """Every number the projection assumes; printed in full with the plan."""

    name: str = "H100 SXM 80GB"
    peak_tflops: float = 989.0  # dense bf16 tensor-core peak, NVIDIA H100 SXM datasheet (1979 is with sparsity)
    gemm_efficiency: float = 0.65  # share of peak bf16 GEMMs reach at 4096-wide 7B shapes
    matmul_time_share: float = 0.60  # share of step time in GEMMs and attention; the rest: norms, RoPE,
    # SiLU, loss, optimizer, launches. 0.65 x 0.60 = 0.39: torchtitan's best measured dense-8B MFU on H100.
    intra_node_busbw_gbs: float = 360.0  # NVLink 4: 450 GB/s per direction per GPU, ~80% as NCCL bus bandwidth
    inter_node_busbw_gbs: float = 40.0  # one 400 Gb/s NDR InfiniBand NIC per GPU = 50 GB/s, ~80% achieved
    comm_overlap: float = 0.7  # share of the shorter of compute and communication hidden under the
    # longer (ZeRO-3 prefetch of the next layers' all-gathers, overlap_comm for reduce-scatters)
    memory_reserve: float = 0.10  # of GPU memory: CUDA context, NCCL buffers, allocator fragmentation

    @property
    def compute_efficiency(self) -> float:
        return self.gemm_efficiency * self.matmul_time_share


H100 = GpuAssumptions()


@dataclass
class MemoryPlan:
    parameters: float
    gradients: float
    optimizer: float
    gathered_layer: float
    buffers: float
    activations_per_sample: float
    reserve: float
    micro_batch: int
    max_micro_batch: int
    deepspeed_estimate: float  # DeepSpeed's own estimator for the same parameter count, all trained
    replicated: float = 0.0  # bf16 parameters at or under the persistence threshold, whole beyond their shard
    replicated_elements: int = 0
    persistence_threshold: int = 0  # zero.param_persistence_threshold, or its size from the hidden size

    @property
    def model_states(self) -> float:
        return self.parameters + self.replicated + self.gradients + self.optimizer + self.gathered_layer

    @property
    def total(self) -> float:
        return self.model_states + self.buffers + self.activations_per_sample * self.micro_batch

    @property
    def fits(self) -> bool:
        """The configured micro-batch fits beside the reserve."""
        return 1 <= self.micro_batch <= self.max_micro_batch


@dataclass
class TokenPlan:
    text_per_sample: int  # text tokens of one sample, before repetition per scale
    visual_per_scale: dict[int, int]  # visual tokens one image contributes at each scale
    lm_tokens_per_sample: float  # language-model tokens of one sample (mean over sampled layouts)
    samples_per_step: int

    @property
    def tokens_per_step(self) -> float:
        return self.lm_tokens_per_sample * self.samples_per_step


@dataclass
class Projection:
    flops_per_sample: float
    flops_per_token: float
    compute_s: float  # one micro-batch on one GPU at the assumed compute efficiency
    comm_bytes: float  # ZeRO-3 collectives of one micro-batch, full buffer size
    comm_s: float
    micro_step_s: float
    mfu: float
    mfu_no_overlap: float
    mfu_full_overlap: float
    tokens_per_s: float  # whole job
    busbw_gbs: float


@dataclass
class Plan:
    cfg: TrainConfig
    cluster: Cluster
    shape: ModelShape
    memory: MemoryPlan
    tokens: TokenPlan
    projection: Projection
    projection_at_max: Projection | None
    assumptions: GpuAssumptions = field(default_factory=GpuAssumptions)


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '80' (GB) or '40960MB' -> bytes. GPU 'GB' are GiB (an H100 80GB has 80 GiB)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|mib|mb|)\s*", text.lower())
    if not match:
        raise ValueError(f"--gpu-mem {text!r}: expected a size such as 80GB or 40960MB")
    scale = {"": GIB, "gb": GIB, "gib": GIB, "mb": 2**20, "mib": 2**20}[match.group(2)]
    return int(float(match.group(1)) * scale)


# Model types `mtrain plan` lays out before mtrain trains them: transformers' own class from the folder's
# config.json, with the run's LoRA or freezing (Qwen2.5-VL's and LLaVA-OneVision's shapes are in configs/models/).
def planned_model_shape(cfg: TrainConfig) -> ModelShape:
    """The configured model (freezing, LoRA, MQT included) built on the meta device: no weights."""
    import torch  # noqa: PLC0415

    from mtrain.model.build import build_model  # noqa: PLC0415

    with torch.device("meta"):
        built = build_model(cfg.model, torch.bfloat16, None, cfg.run.seed, cfg.matryoshka.tokens, config_only=True)
    return model_shape(built.model, built.visual_tokens, built.family.part_names)


def activation_bytes_per_sample(
    shape: ModelShape, lm_tokens: int, images: int = 1, checkpointing: bool = False
) -> float:
    """Stored activations of one sample in bf16, with a memory-efficient attention kernel (no l^2
    score matrix kept).

    Per language-model token and layer (elements): RMSNorm in and out twice (4 h), q (h), k and v
    (2 kv_dim), attention output (h), SwiGLU gate, up, SiLU(gate) and product (4 i). Per token once:
    the final norm (2 h) and the logits: bf16 (2 B), their fp32 copy for the loss (4 B) and the
    saved log-softmax (4 B) over the vocabulary. The vision tower stores nothing when frozen (no
    input or weight needs a gradient); the projector stores its input and hidden when it trains.
    Frozen language-model weights save a little less than counted here: an upper estimate.

    With activation checkpointing each transformer layer keeps only its input (h elements per token)
    and the backward recomputes one layer at a time, so the layers' share becomes
    `layers x h + one layer's activations`; the final norm and the logits are kept as before.
    """
    per_layer = 6 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate
    layers = shape.layers * shape.hidden + per_layer if checkpointing else shape.layers * per_layer
    lm = lm_tokens * (2 * layers + 2 * 2 * shape.hidden + 10 * shape.vocab)
    vision = 0.0
    if shape.vision_trained:
        vision_per_layer = 8 * shape.vision_hidden + 2 * shape.vision_intermediate
        if checkpointing:
            vision_layers = shape.vision_layers * shape.vision_hidden + vision_per_layer
        else:
            vision_layers = shape.vision_layers * vision_per_layer
        vision = images * shape.vision_passes * shape.vision_sequence * 2 * vision_layers
    projector = 0.0
    if shape.projector_trained or shape.vision_trained:
        projector = images * shape.vision_passes * shape.grid_tokens * 2 * (shape.vision_hidden + 2 * shape.hidden)
    return lm + vision + projector


def deepspeed_model_states_estimate(
    total_params: int, largest_layer_params: int, cluster: Cluster, offload: bool, offload_params: bool = False
) -> int:
    """DeepSpeed's own per-GPU figure for ZeRO-3 model states (it assumes every parameter trains);
    `offload` moves the optimizer (and gradients) to CPU, `offload_params` the parameters too."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: PLC0415

    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        total_params,
        largest_layer_params,
        num_gpus_per_node=cluster.gpus_per_node,
        num_nodes=cluster.nodes,
        cpu_offload=offload or offload_params,  # DeepSpeed offloads parameters only beside the optimizer
        cpu_offload_params=offload_params,
        zero_init=True,
    )
    return gpu_bytes


def plan_memory(
    cfg: TrainConfig, shape: ModelShape, cluster: Cluster, layouts: list[list[int]], assumptions: GpuAssumptions
) -> MemoryPlan:
    gpus = cluster.gpus
    offload = cfg.zero.offload_optimizer == "cpu"
    sizes = zero_sizes(cfg.zero, shape.hidden)
    offload_params = cfg.zero.offload_param == "cpu"
    if cfg.matryoshka.tokens.layout == "padded":
        row_tokens = max(len(segments) * max(segments) for segments in layouts)  # padding is computed too
    else:
        row_tokens = max(sum(segments) for segments in layouts)
    activations = activation_bytes_per_sample(shape, row_tokens, checkpointing=cfg.model.activation_checkpointing)
    # DeepSpeed's rule (parameter_offload.mark_persistent_parameters): ds_numel <= threshold stays whole.
    persistent = sum(numel for numel in shape.param_numels if numel <= sizes.param_persistence_threshold)
    memory = MemoryPlan(
        parameters=0.0 if offload_params else 2 * shape.total_params / gpus,
        replicated=0.0 if offload_params else 2 * persistent * (1 - 1 / gpus),
        replicated_elements=persistent,
        persistence_threshold=sizes.param_persistence_threshold,
        gradients=0.0 if offload else 4 * shape.trainable_params / gpus,
        optimizer=0.0 if offload else 12 * shape.trainable_params / gpus,
        gathered_layer=4 * shape.largest_layer_params,
        buffers=2 * (sizes.reduce_bucket_size + sizes.prefetch_bucket_size),
        activations_per_sample=activations,
        reserve=assumptions.memory_reserve * cluster.gpu_memory_bytes,
        micro_batch=cfg.data.micro_batch_size,
        max_micro_batch=0,
        deepspeed_estimate=deepspeed_model_states_estimate(
            shape.total_params, shape.largest_layer_params, cluster, offload, offload_params
        ),
    )
    free = cluster.gpu_memory_bytes - memory.reserve - memory.model_states - memory.buffers
    memory.max_micro_batch = max(0, math.floor(free / activations))
    return memory


def zero3_comm_bytes(shape: ModelShape) -> float:
    """Bytes one micro-batch moves through ZeRO-3 collectives (full buffer size): bf16 weights
    all-gathered for the forward and again for the backward, bf16 gradients of trained parameters
    reduce-scattered. With everything trained: 3 x parameter bytes."""
    return 2 * 2 * shape.total_params + 2 * shape.trainable_params


def recompute_flops(shape: ModelShape, layouts: list[list[int]]) -> float:
    """FLOPs activation checkpointing adds per sample: the forward of the transformer layers again
    (2 x layer parameters per token, plus causal attention's forward share, a third of its training
    FLOPs). Not model FLOPs: it lengthens the step without counting towards MFU."""
    layer_params = shape.lm_params - shape.vocab * shape.hidden - shape.hidden  # lm_head and final norm excluded
    per_layout = [
        2 * layer_params * sum(segments) + sum(attention_flops(shape, s) for s in segments) / 3 for segments in layouts
    ]
    return sum(per_layout) / len(per_layout)


def project(
    shape: ModelShape,
    layouts: list[list[int]],
    micro_batch: int,
    cluster: Cluster,
    assumptions: GpuAssumptions,
    checkpointing: bool = False,
) -> Projection:
    """Step time of one micro-batch on every GPU, compute and ZeRO-3 communication partly overlapped:
    t = max(compute, comm) + (1 - overlap) x min(compute, comm); MFU = model FLOPs / (t x peak).
    With activation checkpointing the compute also runs the layers' forward a second time."""
    peak = assumptions.peak_tflops * 1e12
    per_sample = mean_sample_flops(shape, layouts)
    tokens_per_sample = mean_sample_tokens(layouts)
    flops = micro_batch * per_sample
    recompute = micro_batch * recompute_flops(shape, layouts) if checkpointing else 0.0
    compute_s = (flops + recompute) / (peak * assumptions.compute_efficiency)
    gpus = cluster.gpus
    busbw = assumptions.intra_node_busbw_gbs if cluster.nodes == 1 else assumptions.inter_node_busbw_gbs
    comm_bytes = zero3_comm_bytes(shape) if gpus > 1 else 0.0
    comm_s = comm_bytes * (gpus - 1) / gpus / (busbw * 1e9) if gpus > 1 else 0.0

    def step_time(overlap: float) -> float:
        return max(compute_s, comm_s) + (1 - overlap) * min(compute_s, comm_s)

    step_s = step_time(assumptions.comm_overlap)
    return Projection(
        flops_per_sample=per_sample,
        flops_per_token=per_sample / tokens_per_sample,
        compute_s=compute_s,
        comm_bytes=comm_bytes,
        comm_s=comm_s,
        micro_step_s=step_s,
        mfu=flops / (step_s * peak),
        mfu_no_overlap=flops / (step_time(0.0) * peak),
        mfu_full_overlap=flops / (step_time(1.0) * peak),
        tokens_per_s=gpus * micro_batch * tokens_per_sample / step_s,
        busbw_gbs=busbw,
    )


def make_plan(
    cfg: TrainConfig,
    cluster: Cluster,
    text_tokens: int | None = None,
    assumptions: GpuAssumptions = H100,
    shape: ModelShape | None = None,
) -> Plan:
    """Plan `cfg` on `cluster`; text tokens per sample default to filling `data.max_len`."""
    shape = shape or planned_model_shape(cfg)
    if text_tokens is None:
        text_tokens = cfg.data.max_len - shape.visual_tokens
    if text_tokens < 0:
        raise ValueError(
            f"data.max_len={cfg.data.max_len} is below the {shape.visual_tokens} visual tokens of one image; "
            "raise data.max_len or pass --text-tokens"
        )
    tokens_cfg = cfg.matryoshka.tokens
    layouts = sample_layouts(tokens_cfg, shape.visual_tokens, text_tokens)
    memory = plan_memory(cfg, shape, cluster, layouts, assumptions)
    scales = tokens_cfg.scales if tokens_cfg.mode != "none" else [shape.visual_tokens]
    token_plan = TokenPlan(
        text_per_sample=text_tokens,
        visual_per_scale={scale: scale for scale in scales},
        lm_tokens_per_sample=mean_sample_tokens(layouts),
        samples_per_step=cfg.data.micro_batch_size * cfg.optim.grad_accum_steps * cluster.gpus,
    )
    checkpointing = cfg.model.activation_checkpointing
    projection = project(shape, layouts, cfg.data.micro_batch_size, cluster, assumptions, checkpointing)
    at_max = None
    if memory.max_micro_batch >= 1 and memory.max_micro_batch != cfg.data.micro_batch_size:
        at_max = project(shape, layouts, memory.max_micro_batch, cluster, assumptions, checkpointing)
    return Plan(cfg, cluster, shape, memory, token_plan, projection, at_max, assumptions)


# ── published reference points ─────────────────────────────────────────────────────────────────
# LLaVA-1.5-7B: Vicuna-7B (Llama-2-7B shapes, vocab 32000) + CLIP ViT-L/14-336 + 2-layer MLP projector.
LLAVA15_7B = ModelShape(
    hidden=4096,
    layers=32,
    kv_dim=4096,
    intermediate=11008,
    vocab=32000,
    vision_hidden=1024,
    vision_layers=24,
    vision_intermediate=4096,
    vision_sequence=577,
    grid_tokens=576,
    visual_tokens=576,
    lm_params=32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 32000 * 4096,  # 6.61e9
    lm_trained_params=32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 32000 * 4096,
    vision_params=303_507_456,
    vision_trained=False,
    projector_params=1024 * 4096 + 4096 + 4096 * 4096 + 4096,
    projector_trained=True,
    total_params=7_062_902_784,
    trainable_params=6_759_395_328,
    largest_layer_params=32000 * 4096,
)


@dataclass(frozen=True)
class LlavaFinetuneRun:
    """LLaVA-1.5-7B visual instruction tuning as published: 665k conversations, 1 epoch, ~10 h on 8xA100."""

    conversations: int = 665_298
    text_only: int = 40_688  # the ShareGPT conversations carry no image
    text_tokens: int = 300  # assumed mean text tokens per conversation (not published)
    hours: float = 10.0
    gpus: int = 8
    peak_tflops: float = 312.0  # A100 dense bf16

    def flops(self, text_tokens: int | None = None) -> float:
        text = self.text_tokens if text_tokens is None else text_tokens
        with_image = self.conversations - self.text_only
        text_only = text * lm_flops_per_token(LLAVA15_7B) + 6 * LLAVA15_7B.layers * LLAVA15_7B.hidden * text**2
        return with_image * sample_flops(LLAVA15_7B, [text + 576]) + self.text_only * text_only

    def mfu(self, text_tokens: int | None = None) -> float:
        return self.flops(text_tokens) / (self.gpus * self.peak_tflops * 1e12 * self.hours * 3600)


LLAVA15_RUN = LlavaFinetuneRun()
TORCHTITAN_DENSE_8B_MFU = (0.33, 0.39)  # torchtitan's published Llama-3-8B MFU range on H100


# ── printing ───────────────────────────────────────────────────────────────────────────────────
def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def format_plan(plan: Plan) -> str:
    cfg, shape, memory, tokens, proj, a = (
        plan.cfg,
        plan.shape,
        plan.memory,
        plan.tokens,
        plan.projection,
        plan.assumptions,
    )
    cluster = plan.cluster
    scales = cfg.matryoshka.tokens
    lines = [
        f"mtrain plan: {cluster.nodes} node(s) x {cluster.gpus_per_node} GPU(s) = {cluster.gpus} GPUs, "
        f"{cluster.gpu_memory_bytes / GIB:.0f} GiB each, ZeRO-{cfg.zero.stage}, bf16 mixed precision",
        "",
        "model (built on the meta device from its config: no weights read)",
        f"  parameters           {shape.total_params:>15,}   trainable {shape.trainable_params:,}",
        f"  language model       {shape.lm_params:>15,}   in matmuls (input embedding excluded); "
        f"{shape.lm_trained_params:,} base weights train",
        f"  vision tower         {shape.vision_params:>15,}   {'trains' if shape.vision_trained else 'frozen'}",
        f"  projector            {shape.projector_params:>15,}   {'trains' if shape.projector_trained else 'frozen'}",
        f"  largest layer        {shape.largest_layer_params:>15,}",
        *([f"  images               {shape.image_note}"] if shape.image_note else []),
        "",
        f"memory per GPU (micro-batch {memory.micro_batch})",
        f"  parameters    {_gib(memory.parameters)}   2 B x {shape.total_params:,} / {cluster.gpus}"
        + (" (offloaded to CPU)" if cfg.zero.offload_param == "cpu" else ""),
        f"  gradients     {_gib(memory.gradients)}   4 B x {shape.trainable_params:,} trained / {cluster.gpus}"
        + (" (offloaded to CPU)" if cfg.zero.offload_optimizer == "cpu" else ""),
        f"  optimizer     {_gib(memory.optimizer)}   12 B x {shape.trainable_params:,} trained / {cluster.gpus} "
        "(fp32 master, Adam m, v)" + (" (offloaded to CPU)" if cfg.zero.offload_optimizer == "cpu" else ""),
        f"  gathered      {_gib(memory.gathered_layer)}   4 B x largest layer {shape.largest_layer_params:,}",
        f"  replicated    {_gib(memory.replicated)}   2 B x {memory.replicated_elements:,} in parameters <= "
        f"persistence threshold {memory.persistence_threshold:,}, whole on every GPU",
        f"  model states  {_gib(memory.model_states)}   (DeepSpeed's estimator, all parameters trained: "
        f"{memory.deepspeed_estimate / GIB:.2f} GiB)",
        f"  buffers       {_gib(memory.buffers)}   2 B x (reduce bucket + prefetch bucket)",
        f"  activations   {_gib(memory.activations_per_sample)}   per sample, "
        + ("with" if cfg.model.activation_checkpointing else "no")
        + " activation checkpointing",
        f"  reserve       {_gib(memory.reserve)}   {a.memory_reserve:.0%} of GPU memory",
        f"  total         {_gib(memory.total + memory.reserve)}   of {cluster.gpu_memory_bytes / GIB:.0f} GiB",
        f"  largest micro-batch that fits: {memory.max_micro_batch}"
        + (
            ""
            if memory.max_micro_batch >= 1
            else "  (none: add GPUs, use LoRA, model.activation_checkpointing=true or zero.offload_optimizer=cpu)"
        ),
        "",
        "tokens",
        f"  text per sample      {tokens.text_per_sample}"
        + (
            f"  (data.max_len {cfg.data.max_len} - {shape.visual_tokens} visual)"
            if tokens.text_per_sample == cfg.data.max_len - shape.visual_tokens
            else ""
        ),
        "  visual per scale     "
        + ", ".join(f"{s}" for s in tokens.visual_per_scale)
        + (f"  ({scales.mode}, policy {scales.policy}, layout {scales.layout})" if scales.mode != "none" else ""),
        f"  LM tokens per sample {tokens.lm_tokens_per_sample:,.0f}"
        + ("  (text repeated once per scale)" if scales.mode != "none" and scales.policy == "all" else ""),
        f"  samples per step     {tokens.samples_per_step:,}   micro-batch {cfg.data.micro_batch_size} x accum "
        f"{cfg.optim.grad_accum_steps} x {cluster.gpus} GPUs",
        f"  tokens per step      {tokens.tokens_per_step:,.0f}",
        "",
        f"projection on {a.name}, ZeRO-3, {cluster.gpus} GPUs",
        f"  model FLOPs per sample  {proj.flops_per_sample:.3e}   per LM token {proj.flops_per_token:.3e}",
        f"    dense LM per token   2N + 2N + 2N_trained = {lm_flops_per_token(shape):.3e}   (6N when every LM weight trains)",
        "    attention per segment of l tokens: 6 x layers x hidden x l^2 (causal); vision 2N_v T + 4 L_v d_v T^2 per image",
        f"  compute per micro-batch {proj.compute_s * 1e3:9.1f} ms   at {a.compute_efficiency:.0%} of "
        f"{a.peak_tflops:.0f} TFLOPs"
        + (", the layers' forward run twice (activation checkpointing)" if cfg.model.activation_checkpointing else ""),
        f"  ZeRO-3 traffic          {proj.comm_bytes / 1e9:9.2f} GB per micro-batch   "
        f"(all-gather fwd + bwd 2 x 2 B x params, reduce-scatter 2 B x trained)",
        f"  communication           {proj.comm_s * 1e3:9.1f} ms   at {proj.busbw_gbs:.0f} GB/s bus bandwidth, "
        f"x (GPUs-1)/GPUs",
        f"  step time per micro-batch {proj.micro_step_s * 1e3:7.1f} ms   "
        f"max(compute, comm) + {1 - a.comm_overlap:.1f} x min(compute, comm)",
        f"  projected MFU           {proj.mfu:9.1%}   (no overlap {proj.mfu_no_overlap:.1%}, "
        f"full overlap {proj.mfu_full_overlap:.1%})",
        f"  projected tokens/s      {proj.tokens_per_s:12,.0f}   ({proj.tokens_per_s / cluster.gpus:,.0f} per GPU)",
    ]
    if plan.projection_at_max is not None:
        at_max = plan.projection_at_max
        lines.append(
            f"  at micro-batch {memory.max_micro_batch} (largest that fits): MFU {at_max.mfu:.1%}, "
            f"{at_max.tokens_per_s:,.0f} tokens/s"
        )
    lines += ["", "assumptions"]
    lines += [
        f"  peak                {a.peak_tflops:.0f} TFLOPs dense bf16 per GPU ({a.name} datasheet; 1979 is with sparsity)",
        f"  compute efficiency  {a.compute_efficiency:.2f} = GEMM efficiency {a.gemm_efficiency:.2f} x matmul share "
        f"of step time {a.matmul_time_share:.2f} (anchored on torchtitan's best dense-8B figure)",
        f"  NVLink bus bw       {a.intra_node_busbw_gbs:.0f} GB/s (NVLink 4: 450 GB/s per direction, ~80% achieved); "
        "used when the job fits one node",
        f"  InfiniBand bus bw   {a.inter_node_busbw_gbs:.0f} GB/s per GPU (one 400 Gb/s NDR NIC per GPU, ~80% achieved); "
        "used across nodes",
        f"  overlap             {a.comm_overlap:.0%} of the shorter of compute and communication hidden",
        "  ZeRO-3 re-gathers weights every micro-batch; the traffic of replicated parameters (<= persistence threshold) ignored",
        "  flash-attention style kernels (no l^2 scores kept; packed segments attend within themselves only)",
        "",
        "reference points",
    ]
    run = LLAVA15_RUN
    images = run.conversations - run.text_only
    lines += [
        f"  LLaVA-1.5-7B fine-tune: {run.conversations:,} conversations ({images:,} with one image of 576 tokens), "
        f"~{run.text_tokens} text tokens each (assumed),",
        f"    1 epoch in {run.hours:.0f} h on {run.gpus}xA100 ({run.peak_tflops:.0f} TFLOPs bf16): "
        f"{run.flops():.3e} FLOPs / ({run.gpus} x {run.peak_tflops:.0f}e12 x {run.hours * 3600:,.0f} s) "
        f"= {run.mfu():.1%} MFU",
        f"    (with 200 / 400 text tokens: {run.mfu(200):.1%} / {run.mfu(400):.1%}; LM and projector train, "
        "vision frozen; its gradient checkpointing work is not counted)",
        f"  torchtitan dense Llama-3-8B on H100: {TORCHTITAN_DENSE_8B_MFU[0]:.0%}-{TORCHTITAN_DENSE_8B_MFU[1]:.0%} MFU",
        f"  this plan: {proj.mfu:.1%} projected",
    ]
    return "\n".join(lines)
