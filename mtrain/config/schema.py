"""One small typed dataclass per concern, composed by `TrainConfig`.

Each field is declared with `setting(default, doc)`; `mtrain validate --explain` prints the docs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from data_pipeline.formats import IMAGE_PLACEHOLDER
from mtrain.config.core import Checkable, section, setting


@dataclass
class RunConfig(Checkable):
    name: str = setting("tiny", "Run name, used in logs.")
    dir: str = setting("runs/tiny", "Run folder: resolved config, DeepSpeed JSON, metrics, checkpoints.")
    seed: int = setting(1234, "Seed for model init, data order and every sampler.")
    max_steps: int = setting(40, "Optimizer steps to train for.")
    precision: Literal["auto", "fp32", "bf16"] = setting(
        "auto", "auto picks bf16 on GPU and fp32 on CPU; CPU ranks need fp32 or bf16."
    )
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto picks cuda when a GPU is visible, else cpu.")
    remote_paths: list[str] = setting(
        [], "Keys whose paths exist only where the ranks run, e.g. [data.shards, model.path]: validate skips them."
    )
    nonfinite: Literal["stop", "skip"] = setting(
        "stop", "A non-finite loss or gradient norm (found on log steps and before saves): stop naming it, or skip."
    )

    def check(self) -> list[tuple[str, str]]:
        if self.max_steps < 1:
            return [("max_steps", f"must be at least 1, got {self.max_steps}")]
        known = ("data.shards", "model.path", "checkpoint.init_from")  # mtrain/launch/inputs.py
        unknown = [key for key in self.remote_paths if key not in known]
        if unknown:
            return [("remote_paths", f"{unknown} are not path keys; choose from {list(known)}")]
        return []


@dataclass
class FreezeConfig(Checkable):
    vision_tower: bool = setting(True, "Freeze the vision encoder.")
    projector: bool = setting(False, "Freeze the multimodal projector.")
    language_model: bool = setting(True, "Freeze the language model's base weights (LoRA adapters still train).")
    always_train: list[str] = setting(
        [], "Parameter-name fragments trained even inside a frozen part, e.g. [lm_head] (PEFT's modules_to_save)."
    )


@dataclass
class LoraConfig(Checkable):
    enabled: bool = setting(False, "Attach PEFT LoRA adapters to the language model.")
    rank: int = setting(8, "LoRA rank r.")
    alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = setting(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = setting(
        ["q_proj", "v_proj"], "Projection names inside the language model to adapt (vision tower excluded)."
    )
    strategy: Literal["shared", "per_scale", "shared_plus_per_scale"] = setting(
        "shared",
        "Llama-MTSK: one adapter for all visual scales (MS), one per scale (SS), or a shared one plus one per scale (MSS).",
    )

    def check(self) -> list[tuple[str, str]]:
        if self.rank < 1:
            return [("rank", f"must be a positive integer, got {self.rank}")]
        if not 0.0 <= self.dropout < 1.0:
            return [("dropout", f"must be in [0, 1), got {self.dropout}")]
        if self.enabled and not self.target_modules:
            return [("target_modules", "is empty; name at least one projection, e.g. [q_proj, v_proj]")]
        return []


QWEN_PRESETS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl")  # tiny presets with Qwen's 2x2 patch merger
GEMMA3_PRESET = "tiny-gemma3"  # its projector pools 2x2 patches into one token


def generation_problem(model: str) -> tuple[str, str]:
    """(dotted key, problem) of `eval.generate_samples` on a model whose family generation cannot run yet
    (`ModelFamily.generates`, checked for folders in mtrain/launch/model_checks.py; every tiny preset's family
    generates): `model` names it."""
    message = (
        f"greedy generation (mtrain.infer) does not run {model} yet: it "
        "would splice the visual tokens without the family's own grid, positions or attention; set "
        "eval.generate_samples=0 (the held-out losses per scale still run)"
    )
    return ("eval.generate_samples", message)


def mqt_head_problem(tokens: Any) -> tuple[str, str] | None:
    """(dotted key, problem) of MQT after a family's own projector (every family but llava:
    mtrain/model/mqt_head.py), or None. It trains, `mtrain eval` scores it by loss and by greedy answers
    (mtrain/infer.py), and the Hugging Face export holds its query transformer (mtrain/model/mqt_families.py)."""
    if tokens.mqt_architecture == "mqt_llava":
        message = (
            "mqt_llava is MQT-LLaVA's projector, which replaces a llava model's; this model keeps its own: use mtrain"
        )
        return ("matryoshka.tokens.mqt_architecture", message)
    return None


@dataclass
class TinyLlavaConfig(Checkable):
    hidden_size: int = setting(64, "Language model width.")
    num_layers: int = setting(2, "Language model depth.")
    num_heads: int = setting(4, "Attention heads in the language model.")
    vision_hidden_size: int = setting(32, "Vision tower width.")
    vision_layers: int = setting(2, "Vision tower depth.")
    image_size: int = setting(32, "Input image side in pixels.")
    patch_size: int = setting(4, "Vision patch side; the grid is (image_size / patch_size)^2 tokens.")
    vision_tower: Literal["clip", "siglip"] = setting(
        "clip", "Vision tower: clip (a CLS token, dropped) or siglip (no CLS); either gives the bare patch grid."
    )

    @property
    def visual_tokens(self) -> int:
        """Visual tokens per image: the full patch grid (the CLS token is dropped)."""
        return (self.image_size // self.patch_size) ** 2

    def check(self) -> list[tuple[str, str]]:
        if self.hidden_size % self.num_heads:
            return [("hidden_size", f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")]
        if self.image_size % self.patch_size:
            return [("image_size", f"{self.image_size} is not divisible by patch_size={self.patch_size}")]
        return []


@dataclass
class ModelConfig(Checkable):
    preset: Literal[
        "tiny-llava",
        "tiny-llava-onevision",
        "tiny-llava-next",
        "tiny-qwen2-vl",
        "tiny-qwen2.5-vl",
        "tiny-qwen3-vl",
        "tiny-gemma3",
        "none",
    ] = setting(
        "tiny-llava",
        "Built-in model with random weights and a local tokenizer, sized by model.tiny (tiny-llava: LLaVA-1.5's "
        "shape; tiny-llava-onevision: anyres crops of a SigLIP tower, a Qwen2 LM, a ChatML template; "
        "tiny-llava-next: anyres crops of a CLIP tower, a Llama LM, LLaVA-1.5's template; tiny-qwen2-vl and "
        "tiny-qwen2.5-vl: Qwen's tower and 2x2 patch merger, M-RoPE, Qwen's template; tiny-qwen3-vl: the same "
        "with DeepStack and interleaved M-RoPE, Qwen3-VL's template; tiny-gemma3: a SigLIP tower pooled to a "
        "square grid, Gemma 3's LM and template); 'none' when path is set.",
    )
    path: str | None = setting(None, "Local Hugging Face folder of a LLaVA-family checkpoint (never downloaded).")
    chat_template: str = setting(
        "",
        "Jinja chat template that renders conversations, for a model folder whose tokenizer has none (or to replace "
        "it); empty: the tokenizer's own. It must render an image part as <image>.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "mtrain_varlen_sdpa"] = setting(
        "auto",
        "auto uses flash_attention_2 when flash-attn imports on a GPU, else sdpa; mtrain_varlen_sdpa (by name) attends "
        "each packed document's own block through sdpa's causal kernel (the CPU's varlen path; gemma3 runs sdpa).",
    )
    activation_checkpointing: bool = setting(
        False,
        "Recompute each transformer layer in the backward instead of storing its activations (less memory, ~1/3 more compute).",
    )
    image_size: list[int] = setting(
        [],
        "[height, width] in pixels every image of a qwen2_vl / qwen2_5_vl / qwen3_vl model.path is resized to (multiples of patch_size * "
        "merge_size * the largest M3 pooling factor); the Qwen tiny presets use tiny.image_size square.",
    )
    image_pixels: list[int] = setting(
        [],
        "[min_pixels, max_pixels]: Qwen's native resolution (qwen2_vl / qwen2_5_vl / qwen3_vl, instead of image_size): "
        "each image keeps its aspect ratio and about its size, resized as Qwen's smart_resize does to sides that are "
        "multiples of patch_size * merge_size * every M3 pooling factor, within these pixel counts; M3 scales are "
        "token counts on the reference grid of max_pixels / (patch_size * merge_size)^2 tokens. []: one fixed size.",
    )
    tiny: TinyLlavaConfig = section(TinyLlavaConfig, "Shape of the built-in tiny presets.")
    freeze: FreezeConfig = section(FreezeConfig, "Which parts keep their weights fixed.")
    lora: LoraConfig = section(LoraConfig, "PEFT LoRA on the language model.")

    @property
    def tiny_grid_side(self) -> int:
        """Side of a tiny preset's visual-token grid: patches per side, over Qwen2-VL's 2x2 merger or
        Gemma 3's 2x2 pooling projector."""
        merge = 2 if self.preset in (*QWEN_PRESETS, GEMMA3_PRESET) else 1
        return self.tiny.image_size // self.tiny.patch_size // merge

    @property
    def tiny_visual_tokens(self) -> int:
        """Visual tokens per image of a tiny preset (native resolution: the reference grid's, the most an
        image has)."""
        if self.image_pixels:
            return self.image_pixels[1] // (self.tiny.patch_size * 2) ** 2
        return self.tiny_grid_side**2

    def check(self) -> list[tuple[str, str]]:
        if self.image_size and (len(self.image_size) != 2 or min(self.image_size) < 1):
            return [("image_size", f"is {self.image_size}; give [height, width] in pixels, or [] for none")]
        if self.image_pixels and (len(self.image_pixels) != 2 or not 1 <= self.image_pixels[0] <= self.image_pixels[1]):
            message = f"is {self.image_pixels}; give [min_pixels, max_pixels] with 1 <= min_pixels <= max_pixels"
            return [("image_pixels", message)]
        if self.image_pixels and self.image_size:
            message = "and model.image_size are both set: native resolution keeps each image's size; drop one"
            return [("image_pixels", message)]
        if self.image_pixels and self.preset not in (*QWEN_PRESETS, "none"):
            return [("image_pixels", f"is Qwen's native resolution; the {self.preset} preset has one image size")]
        if self.preset in (*QWEN_PRESETS, GEMMA3_PRESET) and self.tiny.image_size % (self.tiny.patch_size * 2):
            message = f"{self.tiny.image_size} is not a multiple of patch_size * 2 (the preset's 2x2 merger or pooling)"
            return [("tiny.image_size", message)]
        if self.path and self.preset != "none":
            return [("preset", f"is {self.preset!r} but model.path is set too; set model.preset=none to load the path")]
        if not self.path and self.preset == "none":
            return [("path", "is empty and model.preset=none; give a local model folder or a tiny preset")]
        if self.lora.enabled and not self.freeze.language_model:
            return [
                (
                    "lora.enabled",
                    "adapts a frozen language model; set model.freeze.language_model=true or turn LoRA off",
                )
            ]
        if self.freeze.vision_tower and self.freeze.projector and self.freeze.language_model and not self.lora.enabled:
            return [("freeze", "freezes every part and LoRA is off, so nothing would train")]
        return []


@dataclass
class DataSourceConfig(Checkable):
    shards: str = setting("", "Shard paths of this source, brace patterns allowed.")
    weight: float = setting(1.0, "Mixture weight: the share of samples drawn from this source.")

    def check(self) -> list[tuple[str, str]]:
        if not self.shards:
            return [("shards", "is empty; give the source's shard paths, e.g. data/a/shard-{000000..000009}.tar")]
        if not self.weight > 0:
            return [("weight", f"must be > 0, got {self.weight}")]
        return []


@dataclass
class DataConfig(Checkable):
    shards: str = setting(
        "data/sample/shard-{000000..000003}.tar",
        "Shards: paths, brace patterns, globs (sorted), `::`-separated lists, .tar.gz, http(s)://, pipe:CMD, "
        "fsspec URLs.",
    )
    sources: list[DataSourceConfig] = setting(
        [], "Several sources with mixture weights (each {shards, weight}); when set, `shards` is ignored."
    )
    micro_batch_size: int = setting(8, "Rows (sequences) per rank per forward pass.")
    max_len: int = setting(96, "Maximum tokens per sequence, visual tokens included.")
    num_workers: int = setting(0, "DataLoader worker processes per rank (batches are the same for any number).")
    shuffle: bool = setting(True, "Shuffle shards and the samples within each shard by (seed, epoch).")
    prompt: str = setting("<image>\n", "Text placed before each caption; <image> marks the visual tokens.")
    packing: bool = setting(False, "Pack several whole documents into each row of max_len.")
    pack_window: int = setting(64, "Documents the packer chooses from when filling a row.")
    epoch_mode: Literal["epoch", "resampled"] = setting(
        "epoch",
        "epoch: every sample once per epoch, every rank ends each epoch at the same batch; "
        "resampled: endless draws with replacement.",
    )
    max_bad_fraction: float = setting(0.05, "Stop the job when more than this fraction of samples seen is bad.")
    bad_fraction_min_samples: int = setting(200, "Samples a rank must see before max_bad_fraction applies.")
    max_image_pixels: int = setting(4096 * 4096, "Images with more pixels are skipped as oversize_image.")
    require_image: bool = setting(
        False,
        "Skip conversations and documents without an image (counted as no_image); off: text-only samples train "
        "(a caption pair always needs its image).",
    )
    shard_cache_dir: str = setting(
        "", "Folder for local copies of remote and gzipped shards; empty: mtrain-shards-<uid> in the temp folder."
    )
    remote_retries: int = setting(3, "Retries of a remote shard whose read fails before its rest is counted bad.")
    shard_cache_gb: float = setting(
        32.0, "Size limit of data.shard_cache_dir (least recently used copies go); 0: none."
    )

    def check(self) -> list[tuple[str, str]]:
        if self.micro_batch_size < 1:
            return [("micro_batch_size", f"must be at least 1, got {self.micro_batch_size}")]
        if self.num_workers < 0:
            return [("num_workers", f"must be >= 0, got {self.num_workers}")]
        if IMAGE_PLACEHOLDER not in self.prompt:
            return [("prompt", f"{self.prompt!r} has no <image> placeholder; captions need one, e.g. '<image>\\n'")]
        if self.pack_window < 1:
            return [("pack_window", f"must be at least 1, got {self.pack_window}")]
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            return [("max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction}")]
        if self.max_image_pixels < 1:
            return [("max_image_pixels", f"must be at least 1, got {self.max_image_pixels}")]
        if self.remote_retries < 0:
            return [("remote_retries", f"must be >= 0, got {self.remote_retries}")]
        if self.shard_cache_gb < 0:
            return [("shard_cache_gb", f"must be >= 0 (0: no limit), got {self.shard_cache_gb}")]
        return []

    @property
    def source_list(self) -> list[tuple[str, float]]:
        """(shards, weight) of every source; the first one defines the epoch."""
        return [(s.shards, s.weight) for s in self.sources] or [(self.shards, 1.0)]


@dataclass
class OptimConfig(Checkable):
    lr: float = setting(1e-3, "Peak learning rate.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    betas: list[float] = setting([0.9, 0.95], "AdamW betas.")
    eps: float = setting(1e-8, "AdamW epsilon.")
    warmup_steps: int = setting(5, "Linear warmup steps from 0 to lr.")
    min_lr_ratio: float = setting(0.1, "Cosine decay floor as a fraction of lr.")
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this; 0 disables.")
    grad_accum_steps: int = setting(1, "Micro-batches per optimizer step on each rank.")

    def check(self) -> list[tuple[str, str]]:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            return [("lr", f"must be a positive number, got {self.lr}")]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            return [("betas", f"must be two numbers in [0, 1), got {self.betas}")]
        if self.warmup_steps < 0:
            return [("warmup_steps", f"must be >= 0, got {self.warmup_steps}")]
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            return [("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")]
        if self.grad_accum_steps < 1:
            return [("grad_accum_steps", f"must be at least 1, got {self.grad_accum_steps}")]
        if self.grad_clip < 0:
            return [("grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")]
        return []


@dataclass
class ZeroConfig(Checkable):
    stage: int = setting(3, "ZeRO stage; mtrain is built for 3 (parameters, gradients and optimizer sharded).")
    param_persistence_threshold: int | None = setting(
        None,
        "Parameters with at most this many elements stay replicated; null: 0, every parameter sharded.",
    )
    overlap_comm: bool = setting(True, "Overlap gradient reduction with the backward pass.")
    reduce_bucket_size: int | None = setting(
        None,
        "Elements per gradient-reduction bucket; null: the hidden size squared, at least 5e7 (DeepSpeed's default).",
    )
    prefetch_bucket_size: int | None = setting(
        None, "Elements of parameters prefetched ahead of use; null: 0.9 x the hidden size squared, at least 5e7."
    )
    offload_optimizer: Literal["none", "cpu"] = setting(
        "none",
        "cpu: fp32 master weights, Adam state and gradients live in CPU memory; DeepSpeed's CPU Adam steps there.",
    )
    offload_param: Literal["none", "cpu"] = setting(
        "none", "cpu: ZeRO-3 keeps the parameter partitions in CPU memory and copies each layer in when gathered."
    )

    def check(self) -> list[tuple[str, str]]:
        if self.stage not in (0, 1, 2, 3):
            return [("stage", f"must be 0, 1, 2 or 3, got {self.stage}")]
        if self.offload_optimizer == "cpu" and self.stage == 0:
            return [("offload_optimizer", "needs ZeRO (stage 1, 2 or 3) to partition the optimizer; set zero.stage=3")]
        if self.offload_param == "cpu" and self.stage != 3:
            return [("offload_param", f"needs zero.stage=3 (only stage 3 partitions parameters), got {self.stage}")]
        if self.offload_param == "cpu" and self.offload_optimizer != "cpu":
            return [
                (
                    "offload_param",
                    "cpu keeps parameters on the CPU while the optimizer would step on the GPU; "
                    "also set zero.offload_optimizer=cpu",
                )
            ]
        threshold = self.param_persistence_threshold
        if threshold is not None and threshold < 0:
            return [("param_persistence_threshold", f"must be >= 0 or null (sized to the model), got {threshold}")]
        for name in ("reduce_bucket_size", "prefetch_bucket_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                return [(name, f"must be at least 1 or null (sized to the model), got {value}")]
        return []


@dataclass
class DistConfig(Checkable):
    backend: Literal["auto", "gloo", "nccl"] = setting("auto", "auto: nccl on GPU, gloo on CPU.")
    init_timeout_s: int = setting(300, "Seconds to wait for every rank at start-up (the rendezvous) before failing.")
    collective_timeout_s: int = setting(
        3600,
        "Seconds any collective after start-up may wait before the job fails (a hung or dead peer); "
        "rank-0-only work such as the export is never waited for inside one.",
    )
    master_port: int = setting(29500, "Rendezvous port when the launcher does not set MASTER_PORT.")

    def check(self) -> list[tuple[str, str]]:
        if self.init_timeout_s < 1:
            return [("init_timeout_s", f"must be at least 1 second, got {self.init_timeout_s}")]
        if self.collective_timeout_s < 1:
            return [("collective_timeout_s", f"must be at least 1 second, got {self.collective_timeout_s}")]
        if not 1 <= self.master_port <= 65535:
            return [("master_port", f"must be a TCP port 1..65535, got {self.master_port}")]
        return []


@dataclass
class CheckpointConfig(Checkable):
    save_every: int = setting(0, "Save every N optimizer steps; 0 saves only at the end.")
    save_at_end: bool = setting(True, "Save a checkpoint after the last step.")
    export_at_end: bool = setting(True, "Write a Hugging Face export of the final checkpoint.")
    resume: str = setting(
        "auto", "auto: continue from the newest complete checkpoint in the run folder; never; or a checkpoint PATH."
    )
    keep_last: int = setting(3, "Keep the newest N complete checkpoints (latest always kept); 0 keeps all.")
    keep_every: int = setting(0, "Also keep every checkpoint whose step is a multiple of N; 0 disables.")
    init_from: str | None = setting(
        None, "Start from these weights only (checkpoint, export or HF folder): fresh optimizer, schedule, data."
    )
    init_from_adapters: Literal["train", "freeze", "merge"] = setting(
        "train",
        "LoRA adapters of an init_from checkpoint or export: train keeps every one (scale adapters included) and "
        "trains them on, freeze keeps them fixed (both need this run's lora settings to match), merge folds the "
        "default scale's into the weights and starts fresh adapters.",
    )
    verify_checksums: bool = setting(False, "On resume, check every file's checksum against the manifest.")
    start_over: bool = setting(
        False, "With resume=never: move an existing run in run.dir to run.dir/previous/<time>/ and start fresh."
    )

    def check(self) -> list[tuple[str, str]]:
        if self.save_every < 0:
            return [("save_every", f"must be >= 0, got {self.save_every}")]
        if self.keep_last < 0:
            return [("keep_last", f"must be >= 0 (0 keeps all), got {self.keep_last}")]
        if self.keep_every < 0:
            return [("keep_every", f"must be >= 0 (0 disables), got {self.keep_every}")]
        if not self.resume:
            return [("resume", "is empty; use auto, never, or a checkpoint folder")]
        if self.start_over and self.resume != "never":
            return [("start_over", f"starts a fresh run; set checkpoint.resume=never with it (got {self.resume!r})")]
        return []


@dataclass
class LoggingConfig(Checkable):
    log_every: int = setting(
        1, "Log metrics every N optimizer steps; only these steps reduce metrics over ranks (a collective)."
    )
    progress: bool = setting(True, "Show a progress bar on rank 0.")
    tensorboard: bool = setting(True, "Write TensorBoard scalars under <run.dir>/tensorboard.")
    wandb: bool = setting(False, "Also log to Weights & Biases (needs the `wandb` extra: pip install 'mtrain[wandb]').")
    wandb_project: str = setting("mtrain", "W&B project name; the run is named after run.name.")
    wandb_mode: Literal["online", "offline"] = setting(
        "offline", "offline writes <run.dir>/wandb for a later `wandb sync`; online streams to the W&B server."
    )
    peak_tflops: float | None = setting(
        None, "Peak dense TFLOPs per rank for the logged MFU (989 for H100 SXM bf16); null logs no MFU."
    )

    def check(self) -> list[tuple[str, str]]:
        if self.log_every < 1:
            return [("log_every", f"must be at least 1, got {self.log_every}")]
        if self.peak_tflops is not None and not (self.peak_tflops > 0 and math.isfinite(self.peak_tflops)):
            return [("peak_tflops", f"must be a positive number of TFLOPs or null, got {self.peak_tflops}")]
        if self.wandb and not self.wandb_project:
            return [("wandb_project", "is empty; name a W&B project, e.g. logging.wandb_project=mtrain")]
        return []


@dataclass
class TokenScalesConfig(Checkable):
    mode: Literal["none", "m3", "mqt"] = setting(
        "none", "Nested visual tokens: m3 pools the patch grid, mqt keeps the first m queries of a query transformer."
    )
    scales: list[int] = setting(
        [],
        "Visual-token budgets, increasing (m3: on a square grid perfect squares whose side divides the grid side, on "
        "a rows x columns grid (rows / f) * (columns / f) for factors f dividing both; mqt: <= mqt_queries; "
        "mqt empty: every even number up to mqt_queries, as MQT-LLaVA draws m).",
    )
    policy: Literal["all", "sample_per_step", "sample_per_sample"] = setting(
        "all",
        "all: every scale every step, in one pass; sample_per_step: one scale per step, the same on every rank; sample_per_sample: one per sample.",
    )
    weights: list[float] = setting([], "Loss weight per scale under policy all (empty: equal weights).")
    layout: Literal["packed", "padded"] = setting(
        "packed",
        "packed: a sample's scale variants share one row with block-diagonal attention (no padding waste); padded: one row each.",
    )
    default_scale: int = setting(0, "Scale used at inference when a call names none (0: the largest).")
    mqt_queries: int = setting(64, "M, the number of learned queries of the MQT projector.")
    mqt_stage: int = setting(2, "MQT stage 1 always uses all M queries; stage 2 uses the policy's draws.")
    mqt_heads: int = setting(4, "Attention heads of the MQT cross-attention.")
    mqt_architecture: Literal["mtrain", "mqt_llava"] = setting(
        "mtrain",
        "mtrain: queries attend at the LM width to features + positions, with residual and MLP; mqt_llava: "
        "MQT-LLaVA's Resampler (keys = positions only, attention at the vision width, then a projection), "
        "whose checkpoints load; needs a square mqt_queries.",
    )

    def __post_init__(self) -> None:
        # MQT-LLaVA's default budgets (`get_matry_n`: m uniform over 2, 4, ..., M), written out so the
        # resolved config names every trained scale.
        if self.mode == "mqt" and not self.scales and self.mqt_queries >= 2:
            self.scales = list(range(2, self.mqt_queries + 1, 2))

    def check(self) -> list[tuple[str, str]]:
        if self.mode == "none":
            return []
        if not self.scales:
            return [("scales", f"is empty; mode {self.mode} needs the visual-token budgets, e.g. [1, 4, 16, 64]")]
        if sorted(set(self.scales)) != self.scales or self.scales[0] < 1:
            return [("scales", f"must be positive and strictly increasing, got {self.scales}")]
        if self.mode == "mqt":
            if self.scales[-1] > self.mqt_queries:
                return [
                    ("scales", f"{self.scales[-1]} exceeds mqt_queries={self.mqt_queries}; MQT keeps at most M queries")
                ]
            if self.mqt_stage not in (1, 2):
                return [("mqt_stage", f"must be 1 or 2, got {self.mqt_stage}")]
            if self.mqt_architecture == "mqt_llava" and math.isqrt(self.mqt_queries) ** 2 != self.mqt_queries:
                message = f"{self.mqt_queries}: the mqt_llava layout puts its queries on a square grid (e.g. 16, 256)"
                return [("mqt_queries", message)]
        if self.weights and len(self.weights) != len(self.scales):
            return [("weights", f"has {len(self.weights)} entries for {len(self.scales)} scales")]
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) == 0):
            return [("weights", f"must be non-negative with a positive sum, got {self.weights}")]
        if self.default_scale and self.default_scale not in self.scales:
            return [("default_scale", f"{self.default_scale} is not one of the scales {self.scales}")]
        return []


@dataclass
class EmbeddingDimsConfig(Checkable):
    dims: list[int] = setting(
        [], "Nested embedding sizes, increasing, the last at most the embedding width (empty: the full width only)."
    )
    weights: list[float] = setting([], "InfoNCE weight per dim in the MRL sum (empty: 1 each).")
    policy: Literal["mrl", "2dmse", "starbucks"] = setting(
        "mrl",
        "mrl: last layer at every dim; 2dmse: last layer + one drawn shallower layer per micro-batch + KL "
        "(see variant); starbucks: every (layers[i], dims[i]) pair every step + KL to the largest pair.",
    )
    layers: list[int] = setting(
        [],
        "Transformer layers (1-based) embeddings are also taken from: 2dmse draws among them (empty: every layer "
        "below the last); starbucks pairs layers[i] with dims[i].",
    )
    variant: Literal["angle", "sentence_transformers"] = setting(
        "angle",
        "2dmse reference: angle (the paper's AnglE code: full width + one drawn smaller dim at both layers, KL T=1) "
        "or sentence_transformers (Matryoshka2dLoss: dims_per_step drawn dims per layer, KL T=0.3).",
    )
    dims_per_step: int = setting(
        1, "2dmse variant sentence_transformers: dims drawn per layer per micro-batch (n_dims_per_step); 0: all."
    )
    scoring: Literal["auto", "cosine", "dot", "normalised_dot"] = setting(
        "auto",
        "How a (layer, dim) prefix is scored: cosine of the re-normalised prefix, dot of the raw prefix, or dot of "
        "the prefix of the full-width-normalised embedding; auto: cosine for mrl/2dmse, dot for starbucks.",
    )
    kl_temperature: float | None = setting(
        None, "2dmse KL temperature T (loss T*KL); null: the variant's (angle 1.0, sentence_transformers 0.3)."
    )
    kl_weight: float = setting(1.0, "Weight of the KL term (2dmse and starbucks).")
    classes: int = setting(
        0,
        "MRL-E: a classifier over this many classes on the query embedding, one weight W sliced W[:, :k] at every "
        "dim k, trained on each pair's KEY.label.cls; 0: none.",
    )
    classifier_weight: float = setting(1.0, "Weight of the MRL-E classification loss beside the contrastive one.")

    @property
    def resolved_scoring(self) -> str:
        """The scoring a step uses once `auto` is resolved for the policy."""
        if self.scoring != "auto":
            return self.scoring
        return "dot" if self.policy == "starbucks" else "cosine"

    @property
    def resolved_kl_temperature(self) -> float:
        """2dmse's KL temperature once null is resolved for the variant."""
        if self.kl_temperature is not None:
            return self.kl_temperature
        return 1.0 if self.variant == "angle" else 0.3

    def check(self) -> list[tuple[str, str]]:
        if self.dims and (sorted(set(self.dims)) != self.dims or self.dims[0] < 1):
            return [("dims", f"must be positive and strictly increasing, e.g. [8, 16, 32, 64]; got {self.dims}")]
        if self.weights and len(self.weights) != len(self.dims):
            return [("weights", f"has {len(self.weights)} entries for {len(self.dims)} dims")]
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) == 0):
            return [("weights", f"must be non-negative with a positive sum, got {self.weights}")]
        if any(layer < 1 for layer in self.layers):
            return [("layers", f"are 1-based transformer layers; got {self.layers}")]
        if self.policy == "starbucks":
            if not self.layers or len(self.layers) != len(self.dims):
                message = f"starbucks pairs layers[i] with dims[i]: give as many layers as dims ({len(self.dims)})"
                return [("layers", message)]
            if sorted(self.layers) != self.layers:
                return [
                    ("layers", f"starbucks pairs grow from small to large; layers must not decrease: {self.layers}")
                ]
        if self.kl_temperature is not None and self.kl_temperature <= 0:
            return [("kl_temperature", f"must be positive, got {self.kl_temperature}")]
        if self.kl_temperature is not None and self.policy != "2dmse":
            message = f"sets the 2dmse KL; {self.policy} takes none of its own (starbucks uses the contrastive one)"
            return [("kl_temperature", message)]
        if self.classes < 0:
            return [("classes", f"must be >= 0 (0: no MRL-E classifier), got {self.classes}")]
        if self.classifier_weight < 0:
            return [("classifier_weight", f"must be >= 0, got {self.classifier_weight}")]
        if self.dims_per_step < 0:
            return [("dims_per_step", f"must be >= 0 (0: every dim), got {self.dims_per_step}")]
        if self.variant != "angle" and self.policy != "2dmse":
            return [("variant", f"picks the 2dmse reference, but the policy is {self.policy}")]
        if self.dims_per_step != 1 and (self.policy != "2dmse" or self.variant != "sentence_transformers"):
            return [("dims_per_step", "applies to policy 2dmse with variant sentence_transformers only")]
        if self.policy == "2dmse" and self.variant == "angle" and self.weights:
            message = "are not part of AnglE's 2DMSE; drop them or set matryoshka.dims.variant=sentence_transformers"
            return [("weights", message)]
        if self.kl_weight < 0:
            return [("kl_weight", f"must be >= 0, got {self.kl_weight}")]
        return []


@dataclass
class MatryoshkaConfig(Checkable):
    tokens: TokenScalesConfig = section(TokenScalesConfig, "Nested visual-token budgets (M3, MQT).")
    dims: EmbeddingDimsConfig = section(
        EmbeddingDimsConfig, "Nested embedding sizes and layers (MRL, 2DMSE, Starbucks); task.objective=contrastive."
    )


@dataclass
class ContrastiveConfig(Checkable):
    temperature: float = setting(0.02, "InfoNCE temperature (VLM2Vec uses 0.02).")
    pooling: Literal["last", "mean"] = setting(
        "last", "Embedding of a sequence: hidden state of its last real token (either padding side) or the mean."
    )
    projection_dim: int = setting(0, "Linear projection of the pooled state to this width; 0 keeps the model width.")
    query_instruction: str = setting(
        "Represent the image", "Instruction text after the query's image when a pair sample carries none."
    )
    chunk_size: int = setting(
        0, "GradCache: embed this many rows per forward and replay them with cached gradients; 0 embeds all at once."
    )

    def check(self) -> list[tuple[str, str]]:
        if self.temperature <= 0:
            return [("temperature", f"must be positive, got {self.temperature}")]
        if self.projection_dim < 0:
            return [("projection_dim", f"must be >= 0 (0: no projection), got {self.projection_dim}")]
        if self.chunk_size < 0:
            return [("chunk_size", f"must be >= 0 (0: no GradCache), got {self.chunk_size}")]
        return []


@dataclass
class TaskConfig(Checkable):
    objective: Literal["lm", "contrastive"] = setting(
        "lm", "lm: next-token loss on captions; contrastive: InfoNCE embeddings over (query, positive) pair shards."
    )
    token_normalisation: Literal["global", "micro_batch"] = setting(
        "global",
        "Token-mean losses (lm, Matryoshka tokens): global divides a step's summed token losses by its learned "
        "tokens over every micro-batch and rank (gradients of one process holding the global batch); "
        "micro_batch takes each micro-batch's own mean and averages those.",
    )
    contrastive: ContrastiveConfig = section(ContrastiveConfig, "Embedding training (VLM2Vec style).")


@dataclass
class EvalConfig(Checkable):
    shards: str = setting(
        "", "Held-out shards evaluated during training (any form data.shards takes); empty: no evaluation."
    )
    every: int = setting(0, "Evaluate every N optimizer steps (0: only at the end, when eval.at_end).")
    at_end: bool = setting(True, "Also evaluate after the last step.")
    batches: int = setting(0, "Batches per rank in each evaluation; 0: the whole held-out set.")
    scales: list[int] = setting(
        [], "Visual-token budgets to evaluate (lm); empty: the trained scales, or the full grid without any."
    )
    dims: list[int] = setting([], "Embedding dims to evaluate (contrastive); empty: the trained dims.")
    layers: list[int] = setting([], "Layers whose embeddings are evaluated (contrastive); empty: the trained ones.")
    generate_samples: int = setting(
        0,
        "Held-out samples (the first N, over all ranks) answered by greedy generation at every evaluated scale "
        "(lm; also read by mtrain eval); 0: no generation.",
    )
    max_new_tokens: int = setting(32, "The longest generated answer, in tokens (eval.generate_samples).")

    @property
    def enabled(self) -> bool:
        return bool(self.shards)

    def check(self) -> list[tuple[str, str]]:
        if self.every < 0:
            return [("every", f"must be >= 0 (0: only at the end), got {self.every}")]
        if self.batches < 0:
            return [("batches", f"must be >= 0 (0: the whole held-out set), got {self.batches}")]
        if self.generate_samples < 0:
            return [("generate_samples", f"must be >= 0 (0: no generation), got {self.generate_samples}")]
        if self.max_new_tokens < 1:
            return [("max_new_tokens", f"must be >= 1 (the longest generated answer), got {self.max_new_tokens}")]
        if not self.shards and (self.every or self.scales or self.dims or self.layers):
            return [("shards", "is empty, so nothing is evaluated; give held-out shards, e.g. data/heldout/*.tar")]
        for name in ("scales", "dims", "layers"):
            values = getattr(self, name)
            if values and (sorted(set(values)) != values or values[0] < 1):
                return [(name, f"must be positive and strictly increasing, got {values}")]
        return []


@dataclass
class TrainConfig(Checkable):
    run: RunConfig = section(RunConfig, "Run identity, length and precision.")
    model: ModelConfig = section(ModelConfig, "Model source, freezing and adapters.")
    data: DataConfig = section(DataConfig, "Shards and batching.")
    optim: OptimConfig = section(OptimConfig, "Optimizer and learning-rate schedule.")
    zero: ZeroConfig = section(ZeroConfig, "DeepSpeed ZeRO sharding.")
    dist: DistConfig = section(DistConfig, "Process-group start-up.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Saving and export.")
    logging: LoggingConfig = section(LoggingConfig, "Metrics and progress.")
    task: TaskConfig = section(TaskConfig, "Training objective.")
    matryoshka: MatryoshkaConfig = section(MatryoshkaConfig, "Matryoshka structure: nested visual tokens and dims.")
    eval: EvalConfig = section(EvalConfig, "Evaluation on held-out shards during training.")

    def check(self) -> list[tuple[str, str]]:
        tokens = self.matryoshka.tokens
        if self.model.lora.enabled and self.model.lora.strategy != "shared" and tokens.mode == "none":
            return [
                ("model.lora.strategy", f"{self.model.lora.strategy} needs visual scales; set matryoshka.tokens.mode")
            ]
        per_scale_lora = self.model.lora.enabled and self.model.lora.strategy != "shared"
        if (
            per_scale_lora
            and tokens.mode == "mqt"
            and tokens.mqt_stage == 1
            and tokens.mqt_queries not in tokens.scales
        ):
            message = (
                f"MQT stage 1 trains only at all {tokens.mqt_queries} queries, which has no scale adapter among "
                f"{tokens.scales}, so no scale adapter would train; add {tokens.mqt_queries} to the scales or set "
                "model.lora.strategy=shared"
            )
            return [("matryoshka.tokens.mqt_stage", message)]
        if tokens.mode == "mqt" and self.model.preset not in ("tiny-llava", "none"):
            problem = mqt_head_problem(tokens)
            if problem:
                return [problem]
        problem = self.native_resolution_problem()
        if problem:
            return [problem]
        if tokens.mode == "m3" and self.model.preset != "none" and not self.model.image_pixels:
            # A tiny preset's grid is square; a folder's grid is checked by its family (mtrain/launch/model_checks.py).
            bad = [s for s in tokens.scales if round(s**0.5) ** 2 != s]
            if bad:
                message = f"m3 pools a square grid, so every scale is a perfect square; {bad} are not"
                return [("matryoshka.tokens.scales", message)]
            side = self.model.tiny_grid_side
            bad = [s for s in tokens.scales if side % round(s**0.5)]
            if bad:
                message = f"{bad}: the side of each scale must divide the {side}x{side} grid side {side}"
                return [("matryoshka.tokens.scales", message)]
        problem = self.check_embedding() or self.check_eval()
        if problem:
            return [problem]
        if self.run.nonfinite == "skip" and self.zero.stage != 3:
            message = (
                f"skip needs zero.stage=3, got {self.zero.stage}: a step is skipped by ZeRO-3 declining to apply a "
                "non-finite gradient norm, which stages 0-2 do not promise (stage 0 and bf16 apply it), so a NaN "
                "would reach the weights; set zero.stage=3 or run.nonfinite=stop"
            )
            return [("run.nonfinite", message)]
        visual_tokens = self.model.tiny_visual_tokens
        if self.model.preset != "none" and self.data.max_len <= visual_tokens:
            message = f"{self.data.max_len} leaves no room for text after {visual_tokens} visual tokens; raise it"
            return [("data.max_len", message)]
        return []

    def native_resolution_problem(self) -> tuple[str, str] | None:
        """What Qwen's native resolution (`model.image_pixels`) does not train yet, and (tiny presets) scales that
        are no pooling factor of its reference grid; a folder's scales are checked by its family."""
        if not self.model.image_pixels:
            return None
        tokens = self.matryoshka.tokens
        if tokens.mode == "mqt":
            return (
                "matryoshka.tokens.mode",
                "is 'mqt', which model.image_pixels (native resolution) does not train yet",
            )
        if self.eval.generate_samples:
            return ("eval.generate_samples", "does not run with model.image_pixels (native resolution) yet; set 0")
        reference = self.model.tiny_visual_tokens
        if self.model.preset == "none":
            return None
        checked = {
            "matryoshka.tokens.scales": tokens.scales if tokens.mode == "m3" else [],
            "eval.scales": self.eval.scales,
        }
        for key, scales in checked.items():
            bad = [s for s in scales if reference % s or math.isqrt(reference // s) ** 2 != reference // s]
            if bad:
                root = math.isqrt(reference)
                fitting = [reference // (f * f) for f in range(root, 0, -1) if not reference % (f * f)]
                message = (
                    f"{bad} are no pooling factor f of the {reference}-token reference grid of model.image_pixels "
                    f"(a scale is {reference} / f^2: {fitting})"
                )
                return (key, message)
        return None

    def scales_without_adapter(self, scales: list[int]) -> list[int]:
        """The visual-token scales a model with per-scale LoRA has no adapter for: evaluated there, it would
        run with none, silently (checked for `eval.scales` here and for `mtrain eval --scales`)."""
        lora, tokens = self.model.lora, self.matryoshka.tokens
        if not (lora.enabled and lora.strategy != "shared" and tokens.mode != "none"):
            return []
        return [s for s in scales if s not in tokens.scales]

    def check_eval(self) -> tuple[str, str] | None:
        """The evaluated budgets against the objective and the model (known here for the tiny preset)."""
        budgets, tokens = self.eval, self.matryoshka.tokens
        contrastive = self.task.objective == "contrastive"
        if budgets.scales and contrastive:
            return ("eval.scales", "are visual-token budgets of task.objective=lm; evaluate eval.dims instead")
        if (budgets.dims or budgets.layers) and not contrastive:
            return ("eval.dims", "are embedding budgets of task.objective=contrastive; evaluate eval.scales instead")
        if budgets.generate_samples and contrastive:
            return ("eval.generate_samples", "needs task.objective=lm: an embedding model answers nothing; set 0")
        untrained = self.scales_without_adapter(budgets.scales)
        if untrained:
            message = (
                f"{untrained} have no {self.model.lora.strategy} LoRA adapter (trained: {tokens.scales}); drop them"
            )
            return ("eval.scales", message)
        if self.model.preset == "none":
            return None
        visual_tokens, side = self.model.tiny_visual_tokens, self.model.tiny_grid_side
        limit = tokens.mqt_queries if tokens.mode == "mqt" else visual_tokens
        if budgets.scales and budgets.scales[-1] > limit:
            return ("eval.scales", f"{budgets.scales[-1]} exceeds the {limit} visual tokens an image has")
        if (
            tokens.mode != "mqt"
            and not self.model.image_pixels
            and any(side % max(math.isqrt(s), 1) or math.isqrt(s) ** 2 != s for s in budgets.scales)
        ):
            return ("eval.scales", f"{budgets.scales}: each must be a square whose side divides the grid side {side}")
        if budgets.layers and budgets.layers[-1] > self.model.tiny.num_layers:
            return ("eval.layers", f"{budgets.layers} name layers beyond the model's {self.model.tiny.num_layers}")
        return None

    def check_embedding(self) -> tuple[str, str] | None:
        """Dims and layers against the embedding width and depth (known here for the tiny preset)."""
        dims, contrastive = self.matryoshka.dims, self.task.contrastive
        if self.task.objective != "contrastive":
            if dims.dims or dims.layers:
                return ("matryoshka.dims", "nests embedding sizes, which only task.objective=contrastive trains")
            return None
        if self.matryoshka.tokens.mode != "none":
            return ("matryoshka.tokens.mode", "visual-token scales train with task.objective=lm; set mode none")
        if self.data.packing:
            return ("data.packing", "(query, positive) pairs are one row each and cannot be packed; set it to false")
        width = contrastive.projection_dim or (self.model.tiny.hidden_size if self.model.preset != "none" else 0)
        if width and dims.dims and dims.dims[-1] > width:
            source = "task.contrastive.projection_dim" if contrastive.projection_dim else "model.tiny.hidden_size"
            return ("matryoshka.dims.dims", f"{dims.dims[-1]} exceeds the embedding width {width} ({source})")
        if dims.classes and contrastive.chunk_size:
            message = "GradCache replays only the embeddings' gradient, so the MRL-E classifier would not train"
            return ("matryoshka.dims.classes", f"{message}; set task.contrastive.chunk_size=0 or classes=0")
        if contrastive.projection_dim and self.checkpoint.export_at_end:
            message = (
                "a projection head is not part of the Hugging Face export yet; set checkpoint.export_at_end=false "
                "and load embeddings with mtrain.embed.Embedder.from_checkpoint"
            )
            return ("task.contrastive.projection_dim", message)
        depth = self.model.tiny.num_layers if self.model.preset != "none" else 0
        if depth and any(layer > depth for layer in dims.layers):
            return ("matryoshka.dims.layers", f"{dims.layers} name layers beyond the model's {depth}")
        if dims.policy == "2dmse" and depth == 1 and not dims.layers:
            return ("matryoshka.dims.policy", "2dmse needs a layer below the last; the model has one layer")
        return None
