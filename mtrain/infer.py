"""Inference on an mtrain export with stock transformers + PEFT: generate at a visual-token scale,
embed at a Matryoshka dim and layer. Nothing of mtrain's training code is imported.

    from mtrain.infer import MatryoshkaModel, load_processor

    model = MatryoshkaModel.from_export("runs/m3/export")           # reads export/mtrain.json
    processor = load_processor("runs/m3/export/model", model.llava.config)  # AutoProcessor, Qwen's without torchvision
    inputs = processor(images=image, text=prompt, return_tensors="pt")  # <image> -> the full grid
    answer = model.generate(**inputs, scale=16, max_new_tokens=32)     # 16 visual tokens per image
    vectors = MatryoshkaModel.from_export("runs/embed/export").embed(**inputs, dim=64, layer=12)

How a scale runs (the same steps as training, mtrain/task/matryoshka_tokens.py):

    prompt ids, every <image> expanded to the full grid (as the exported processor does)
      -> keep the first `scale` tokens of every image run (`image_keep_mask`), left-pad
      -> vision tower + projector at full size -> M3: average-pool the grid to `scale` tokens
                                                  MQT: keep the first `scale` query outputs
      -> splice the features into the text embeddings -> the language model (`generate`)

Per family (`GENERATING_MODEL_TYPES`; any other model type is refused with the reason):
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL (the processor's `image_grid_thw`): each image's merged grid is pooled by
  the factor per side that leaves `scale` tokens, and the stock `generate` makes the prompt's M-RoPE ids from
  the pooled grids (`get_rope_index`, as training does) and continues them for the new tokens. Qwen3-VL's
  DeepStack sets are pooled alike and given, with the merged tokens, as pre-encoded image outputs.
- LLaVA-NeXT / OneVision (the processor's `image_sizes`): every crop pooled before the merge, by the family's
  own rule (`mtrain/model/anyres.py`, the pure tensor code the family uses too).
- Gemma 3: `token_type_ids` mark the image tokens at the scale, so the prefill attends within each (pooled)
  image both ways, as training does; its visual tokens go in as pre-encoded image outputs.
- MQT after a family's own projector (every family but llava: the training model's `mqt_head`, or an export's
  `mtrain_mqt_<family>` class): each image's stock visual tokens (Qwen's merged patches with Qwen3-VL's DeepStack
  sets, anyres's base image and crops, Gemma 3's soft tokens) read by the query transformer, the first `scale`
  of its M outputs kept, as training's `image_features`; a prompt's image stands for the M query tokens (as the
  data expands it). The query tokens take text positions (Qwen: every M-RoPE axis the 1-D id), and on Gemma 3
  attend to each other both ways, as training gives them.

Scale-specific LoRA (strategy per_scale or shared_plus_per_scale): the base model (export/base, or
the base each adapter names) with every adapter of export/adapter loaded; a call at scale s makes
`scale_s` (and `shared`) the active adapters, which is what the token masks of training amount to
when every token of the forward has one scale. Without scale adapters export/model is used: it is
merged at the default scale.

Embeddings follow mtrain/task/contrastive.py: the hidden states of `layer` pooled as trained
(`embedding.json`), through the projection head when there is one, truncated to `dim` and
L2-normalised. `export/model/config.json` also lists `matryoshka_dimensions` for serving stacks.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtrain.model.anyres import anyres_scaled_features, image_tokens, tower_grid_side
from mtrain.model.embedding_head import pool_last_token, pool_mean, truncate
from mtrain.model.token_scales import (
    grid_factor,
    image_keep_mask,
    merged_grid,
    pool_grid,
    pool_merged,
    pooled_grid_thw,
)

EXPORT_METADATA = "mtrain.json"  # written by mtrain/checkpoint/export.py
EMBEDDING_FILE = "embedding.json"  # written by mtrain/checkpoint/embedding_export.py
HEAD_WEIGHTS_FILE = "embedding_head.safetensors"
SCALE_STRATEGIES = ("per_scale", "shared_plus_per_scale")
SHARED_ADAPTER = "shared"
PROMPT_INPUTS = ("input_ids", "pixel_values", "attention_mask", "image_grid_thw", "image_sizes")  # a processor's
# What Qwen's and Gemma 3's processors give for the full grid's image positions: remade at the scale.
FULL_GRID_INPUTS = ("mm_token_type_ids", "token_type_ids")
# The model types whose visual tokens `scaled_inputs` places as training does (their families' `generates`).
GENERATING_MODEL_TYPES = (
    "llava", "mtrain_mqt_llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3",
    "mtrain_mqt_llava_next", "mtrain_mqt_llava_onevision", "mtrain_mqt_qwen2_vl", "mtrain_mqt_qwen2_5_vl",
    "mtrain_mqt_qwen3_vl", "mtrain_mqt_gemma3",
)  # fmt: skip
# An MQT export's model type (mtrain/model/mqt_families.py): this prefix, then its family's.
MQT_EXPORT_PREFIX = "mtrain_mqt_"
# Anyres crops (`image_sizes`): each image's crops pooled at the scale before the merge, by its family's rule.
ANYRES_MODEL_TYPES = ("llava_next", "llava_onevision")
# The model types whose image tokens attend to each other both ways (`token_type_ids` marks them), as trained.
IMAGE_ATTENTION_MODEL_TYPES = ("gemma3",)
# Native-resolution images (`image_grid_thw`): their stock processor classes cannot be built without torchvision
# (their video processor needs it), so prompts come from the tokenizer and image processor (`ImagePromptProcessor`).
NATIVE_RESOLUTION_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# The model types whose generation prompts `ImagePromptProcessor` builds: Qwen's and OneVision's, whose processor
# classes need torchvision, and Gemma 3's, whose stock processor writes its own text around each <start_of_image>
# (256 soft tokens unless configured), where the template mtrain trains with writes the image's markers itself.
PROMPT_BUILT_MODEL_TYPES = (*NATIVE_RESOLUTION_MODEL_TYPES, "llava_onevision", "gemma3")


@dataclass
class MatryoshkaSpec:
    """The `matryoshka` block of an export's mtrain.json, plus embedding.json for embedding exports."""

    token_mode: str = "none"
    scales: list[int] = field(default_factory=list)
    default_scale: int | None = None
    mqt_queries: int | None = None
    strategy: str | None = None
    dims: list[int] = field(default_factory=list)
    embedding: dict[str, Any] | None = None  # embedding.json: dims, layers, last_layer, pooling, ...

    @classmethod
    def read(cls, folder: Path) -> MatryoshkaSpec:
        meta_file = folder / EXPORT_METADATA
        if not meta_file.is_file():
            raise FileNotFoundError(f"{folder} has no {EXPORT_METADATA}: give the folder `mtrain export` wrote")
        block = json.loads(meta_file.read_text()).get("matryoshka", {})
        embedding_file = folder / EMBEDDING_FILE
        return cls.from_block(block, json.loads(embedding_file.read_text()) if embedding_file.is_file() else None)

    @classmethod
    def from_block(cls, block: dict[str, Any], embedding: dict[str, Any] | None = None) -> MatryoshkaSpec:
        """The spec of a `matryoshka` block (mtrain.json's, or a training config's own, as the export writes it)."""
        return cls(
            token_mode=block.get("token_mode", "none"),
            scales=block.get("scales") or [],
            default_scale=block.get("default_scale"),
            mqt_queries=block.get("mqt_queries"),
            strategy=block.get("strategy"),
            dims=block.get("dims") or [],
            embedding=embedding,
        )


class MatryoshkaModel:
    """A stock Hugging Face model (with PEFT adapters for scale-specific LoRA) run as mtrain trained it."""

    def __init__(
        self, model: nn.Module, spec: MatryoshkaSpec, head: nn.Module | None = None, routing: Any = None
    ) -> None:
        self.model = model.eval()
        self.spec = spec
        self.head = head  # the embedding projection, when the embedding export has one
        # A training model's scale routing (`set_rows`/`clear`, mtrain/model/scale_lora.py): there every
        # scale adapter stays active and is masked per token, so a scale is chosen by routing the rows to it.
        self.routing = routing
        self.llava = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.image_token_id = self.llava.config.image_token_id
        # The model's family, an MQT export's (`mtrain_mqt_<family>`) without the prefix.
        self.family_type = self.llava.config.model_type.removeprefix(MQT_EXPORT_PREFIX)

    @classmethod
    def from_export(cls, export_dir: str | Path, dtype: torch.dtype = torch.float32) -> MatryoshkaModel:
        """Load `export_dir` (what `mtrain export` or the end of training wrote)."""
        from transformers import AutoModelForImageTextToText  # noqa: PLC0415

        folder = Path(export_dir)
        spec = MatryoshkaSpec.read(folder)
        if spec.strategy in SCALE_STRATEGIES:
            model = load_scale_adapters(folder, spec, dtype)
        else:
            # An MQT export carries its projector's modelling code (mtrain/model/mqt_model.py, via
            # auto_map): stock transformers runs it only with trust_remote_code.
            model = AutoModelForImageTextToText.from_pretrained(
                folder / "model", dtype=dtype, trust_remote_code=spec.token_mode == "mqt"
            )
        return cls(model, spec, load_projection(folder, spec, dtype))

    # ── visual-token scales ───────────────────────────────────────────────────────────────────
    def check_scale(self, scale: int | None) -> int | None:
        """The scale to run (None: the full grid); refuses one the model has no adapter for."""
        spec = self.spec
        if scale is None:
            return spec.default_scale
        if spec.strategy in SCALE_STRATEGIES and scale not in spec.scales:
            raise ValueError(f"scale={scale} has no adapter: this export trained scale adapters for {spec.scales}")
        return scale  # also an M3 view of a model trained at the full grid only, as `mtrain eval --scales` gives

    def check_generates(self) -> None:
        """Refuse a model whose family these steps do not run as it was trained (its own image grid, M-RoPE
        positions, image attention): its answers would be wrong, or transformers would fail deep inside."""
        model_type = self.llava.config.model_type
        if model_type not in GENERATING_MODEL_TYPES:
            raise ValueError(
                f"this is a {model_type!r} model; mtrain.infer generates (and scores logits) for the model types "
                f"{', '.join(GENERATING_MODEL_TYPES)} only yet; `mtrain eval` scores it by its held-out losses per scale"
            )

    @property
    def query_head(self) -> nn.Module | None:
        """MQT's query transformer after the family's own projector (the training model's `mqt_head`, an export's
        too); None without MQT, and for LLaVA's MQT, whose projector is the query transformer."""
        return getattr(self.llava.model, "mqt_head", None) if self.spec.token_mode == "mqt" else None

    def use_scale_adapters(self, scale: int) -> None:
        """Make `scale_<scale>` (and `shared`) the active LoRA adapters; trained modules stay active."""
        names = [f"scale_{scale}"] + ([SHARED_ADAPTER] if self.spec.strategy == "shared_plus_per_scale" else [])
        self.model.base_model.set_adapter(names)
        # Training attached `modules_to_save` (projector, lm_head) to the first adapter only, and had
        # every adapter active: keep that adapter's copy of those modules active at every scale.
        from peft.utils import ModulesToSaveWrapper  # noqa: PLC0415

        carrier = adapter_order(self.spec)[0]
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper) and carrier in module.modules_to_save:
                module.set_adapter(carrier, inference_mode=True)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens of every image at full size: (images, tokens, dim)."""
        output = self.llava.model.get_image_features(pixel_values=pixel_values.to(self.llava.dtype), return_dict=True)
        return torch.stack(list(output.pooler_output))

    def at_scale(self, features: torch.Tensor, scale: int) -> torch.Tensor:
        if self.spec.token_mode != "mqt":
            return pool_grid(features, scale)
        queries = self.spec.mqt_queries or features.shape[1]
        if features.shape[1] != queries:
            raise ValueError(
                f"this model's projector gives {features.shape[1]} tokens per image, not the {queries} MQT "
                "queries it was trained with: the export's query-transformer projector did not load"
            )
        return features[:, :scale]  # MQT queries attend only to the image: a prefix is an m-query pass

    def scaled_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        scale: int | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The spliced `inputs_embeds` (Gemma 3: the ids and the pre-encoded visual tokens), `attention_mask` and
        the positions of a prompt whose images run at `scale`, rows left-padded (for generation): 1-D
        `position_ids`, or, for Qwen's native-resolution images (`image_grid_thw`), what the stock model makes
        its M-RoPE ids from."""
        self.check_generates()
        scale = self.check_scale(scale)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.spec.strategy in SCALE_STRATEGIES and self.routing is None:
            self.use_scale_adapters(scale)
        visual, runs, grid_thw = None, [], None
        ids, mask = input_ids, attention_mask
        if pixel_values is not None and bool((input_ids == self.image_token_id).any()):
            visual, runs, grid_thw = self.visual_at_scale(pixel_values, image_grid_thw, scale, image_sizes)
            check_image_runs(input_ids, self.image_token_id, runs)
            keep = run_keep_mask(input_ids, attention_mask, self.image_token_id, runs)
            ids, mask = keep_left_padded(input_ids, attention_mask, keep)
        is_image = ids == self.image_token_id
        if self.family_type in IMAGE_ATTENTION_MODEL_TYPES:
            # Gemma 3 generates from no embeddings: its prompt's ids and the visual tokens at the scale, given as
            # pre-encoded image outputs, which its forward splices; `token_type_ids` make the prefill attend within
            # each (pooled) image both ways, as training does (new tokens are causal).
            inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": is_image.long()}
            if visual is not None:
                from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: PLC0415

                inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=visual)}
            return inputs | {"position_ids": (mask.long().cumsum(1) - 1).clamp(min=0)}
        embed_tokens = self.llava.get_input_embeddings()
        if visual is not None and visual.shape[-1] > embed_tokens.embedding_dim:
            return deepstack_inputs(ids, mask, is_image, visual, runs, grid_thw, embed_tokens.embedding_dim)
        embeddings = embed_tokens(ids)
        if visual is not None:
            embeddings = embeddings.masked_scatter(is_image.unsqueeze(-1), visual.to(embeddings.dtype))
        inputs = {"inputs_embeds": embeddings, "attention_mask": mask}
        if grid_thw is None:  # 1-D positions (and a text-only Qwen prompt, whose three M-RoPE axes are them)
            return inputs | {"position_ids": (mask.long().cumsum(1) - 1).clamp(min=0)}
        # M-RoPE: the stock model makes the prompt's ids from its tokens, which of them are image positions and
        # the pooled grids (`get_rope_index`, the ids training's `layout_position_ids` gives), and continues every
        # row from its largest id for each new token (`rope_deltas`), as its own generate does.
        return inputs | {"input_ids": ids, "mm_token_type_ids": is_image.int(), "image_grid_thw": grid_thw}

    def visual_at_scale(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor | None,
        scale: int | None,
        image_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor | None]:
        """(every image's visual tokens at `scale`, in order: (tokens, dim), Qwen3-VL's DeepStack sets after the
        width on the channel axis; (full, kept) tokens of each image; the pooled `image_grid_thw`, or None for a
        family of one fixed grid). M3 pools a native-resolution image (Qwen: `image_grid_thw`) by the factor per
        side that leaves `scale` tokens of its merged grid; MQT keeps the first `scale` queries (`queries_at_scale`)."""
        if self.query_head is not None:
            return self.queries_at_scale(pixel_values, image_grid_thw, scale, image_sizes)
        if self.family_type in ANYRES_MODEL_TYPES:
            return self.anyres_at_scale(pixel_values, image_sizes, scale)
        if image_grid_thw is None:
            features = self.image_features(pixel_values)
            images, full = features.shape[:2]
            visual = self.at_scale(features, scale or full)
            return visual.flatten(0, 1), [(full, visual.shape[1])] * images, None
        merge = self.llava.config.vision_config.spatial_merge_size
        output = self.llava.model.get_image_features(
            pixel_values=pixel_values.to(self.llava.dtype), image_grid_thw=image_grid_thw, return_dict=True
        )
        # Qwen3-VL's DeepStack sets ride beside the merged tokens on the channel axis, pooled alike (as training).
        levels = [output.pooler_output, *(getattr(output, "deepstack_features", None) or [])]
        pooled, runs, grids = [], [], []
        for image, thw in enumerate(image_grid_thw):
            features = torch.cat([level[image] for level in levels], dim=-1)
            grid = merged_grid(thw, merge)
            factor = grid_factor(grid[1:], scale) if scale else 1
            pooled.append(pool_merged(features, grid, factor))
            runs.append((features.shape[0], pooled[-1].shape[0]))
            grids.append(pooled_grid_thw(thw, factor))
        return torch.cat(pooled), runs, torch.stack(grids)

    def queries_at_scale(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None, scale: int | None, image_sizes: Any
    ) -> tuple[torch.Tensor, list[tuple[int, int]], None]:
        """MQT after the family's own projector: each image's stock visual tokens, with Qwen3-VL's DeepStack sets on
        the channel axis, read by the query transformer (each set as its own image: `read_levels`), as training's
        `image_features`; the first `scale` of the M outputs kept. No grid: the query tokens take text positions."""
        inputs = {"pixel_values": pixel_values.to(self.llava.dtype)}
        if image_grid_thw is not None:
            inputs["image_grid_thw"] = image_grid_thw
        if self.family_type in ANYRES_MODEL_TYPES:
            if image_sizes is None:
                raise ValueError("an anyres model needs each image's (height, width): give the processor's image_sizes")
            inputs["image_sizes"] = torch.as_tensor(image_sizes)
        inner = self.llava.model
        # An export's class reads its images with the head inside get_image_features: its family's tokens come first.
        family_features = getattr(inner, "family_image_features", inner.get_image_features)
        output = family_features(**inputs, return_dict=True)
        levels = [output.pooler_output, *(getattr(output, "deepstack_features", None) or [])]
        images = [torch.cat([level[i] for level in levels], dim=-1) for i in range(len(levels[0]))]
        head = self.query_head
        if len({tuple(image.shape) for image in images}) == 1:  # one call, as training reads a batch
            queries = head.read_levels(torch.stack(images))
        else:
            queries = torch.cat([head.read_levels(image[None]) for image in images])
        full = queries.shape[1]
        if self.spec.mqt_queries and full != self.spec.mqt_queries:
            raise ValueError(f"this model's query transformer gives {full} queries, not the {self.spec.mqt_queries} "
                             "MQT queries it was trained with: the export's head did not load")  # fmt: skip
        kept = queries[:, : scale or full]
        return kept.flatten(0, 1), [(full, kept.shape[1])] * len(images), None

    def anyres_at_scale(
        self, pixel_values: torch.Tensor, image_sizes: Any, scale: int | None
    ) -> tuple[torch.Tensor, list[tuple[int, int]], None]:
        """LLaVA-NeXT / OneVision: every crop (the base image's too) pooled to the scale's k x k before the crops
        are merged, unpadded for the image's size, newlines after each row (`LlavaOnevisionFamily`'s M3 rule, the
        stock tokens at k = g)."""
        if image_sizes is None:
            raise ValueError("an anyres model needs each image's (height, width): give the processor's image_sizes")
        config = self.llava.config
        listed = image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes
        sizes = [(int(height), int(width)) for height, width in listed]
        side = tower_grid_side(config)
        scale = scale or side * side  # the full scale: each crop's whole g x g grid
        features = anyres_scaled_features(self.llava, pixel_values.to(self.llava.dtype), sizes, [scale])[scale]
        runs = [(image_tokens(config, size), image_tokens(config, size, math.isqrt(scale))) for size in sizes]
        return features.flatten(0, 1), runs, None

    @torch.no_grad()
    def logits(self, scale: int | None = None, **prompt: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits of every position of the (left-padded) prompt at `scale`; the prompt's
        `input_ids`, `pixel_values`, `attention_mask` (and `image_grid_thw`) as the processor gives them."""
        for name in FULL_GRID_INPUTS:
            prompt.pop(name, None)
        inputs = self.scaled_inputs(**prompt, scale=scale)
        with self.routed(inputs["attention_mask"], scale):
            return self.model(**inputs, use_cache=False).logits

    @torch.no_grad()
    def generate(self, scale: int | None = None, **kwargs: Any) -> torch.Tensor:
        """The new tokens only, each image at `scale` tokens.

        `input_ids`, `pixel_values`, `attention_mask` (and Qwen's `image_grid_thw`) as the processor gives
        them (`**inputs`); every other keyword goes to transformers' `generate`."""
        prompt = {name: kwargs.pop(name) for name in PROMPT_INPUTS if name in kwargs}
        for name in FULL_GRID_INPUTS:
            kwargs.pop(name, None)
        inputs = self.scaled_inputs(**prompt, scale=scale)
        inputs.pop("position_ids", None)  # generate derives 1-D ids from the left-padded mask
        with self.routed(inputs["attention_mask"], scale):
            new = self.model.generate(**inputs, **kwargs)
        # Given the prompt's ids too (Qwen's M-RoPE, Gemma 3), generate returns them first; from embeddings alone, none.
        return new[:, inputs["input_ids"].shape[1] :] if "input_ids" in inputs else new

    @contextlib.contextmanager
    def routed(self, prompt_mask: torch.Tensor, scale: int | None) -> Iterator[None]:
        """Every token of the language model's forwards on the prompt of `prompt_mask` (rows, tokens) routed
        to `scale`'s adapters (a training model's routing; nothing to do for an export, whose adapters
        `scaled_inputs` switched). One scale per row broadcasts over the prompt and each new token."""
        if self.routing is None or self.spec.strategy not in SCALE_STRATEGIES:
            yield
            return
        scale = self.check_scale(scale)
        if scale is None:
            raise ValueError(f"give a scale: this model's LoRA adapters are per scale ({self.spec.scales})")
        self.routing.set_rows(torch.full((prompt_mask.shape[0], 1), scale, device=prompt_mask.device))
        try:
            yield
        finally:
            self.routing.clear()

    # ── Matryoshka embeddings ─────────────────────────────────────────────────────────────────
    @torch.no_grad()
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        dim: int | None = None,
        layer: int | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **image_marks: torch.Tensor,
    ) -> torch.Tensor:
        """(rows, dim) unit vectors: the first `dim` coordinates (default: the largest trained) of the
        embedding at hidden layer `layer` (default: the last), re-normalised. The prompt as the processor gives
        it, every image at its full grid (Qwen's `image_grid_thw`, anyres `image_sizes`); the image positions it
        marks (`FULL_GRID_INPUTS`) are remade from the ids."""
        unknown = set(image_marks) - set(FULL_GRID_INPUTS)
        if unknown:
            raise TypeError(f"embed() got unexpected keyword arguments {sorted(unknown)}")
        meta = self.spec.embedding
        if meta is None:
            raise ValueError(f"this export has no {EMBEDDING_FILE}: it is not an embedding model (task.objective)")
        dim, layer = dim or meta["dims"][-1], layer or meta["last_layer"]
        if not 1 <= layer <= meta["last_layer"]:
            raise ValueError(f"layer={layer} is outside 1..{meta['last_layer']}; trained layers: {meta['layers']}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixel_values is not None and pixel_values.shape[0]:
            inputs |= self.image_inputs(input_ids, pixel_values, image_grid_thw, image_sizes)
        # The stock forward places the images as the family's training task does (mtrain/task/contrastive.py):
        # Qwen's merged tokens with M-RoPE ids from their grids, Gemma 3's attention within each image.
        hidden = self.llava.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[layer]
        pooled = (pool_last_token if meta["pooling"] == "last" else pool_mean)(hidden, attention_mask)
        if self.head is not None:
            pooled = self.head(pooled)
        return truncate(pooled, dim)

    def image_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None,
                     image_sizes: torch.Tensor | None) -> dict[str, torch.Tensor]:  # fmt: skip
        """The stock forward's image arguments for a prompt whose images are at their full grid: the pixels, and
        what the family needs to place them (Qwen: `image_grid_thw` and the image positions it makes M-RoPE ids
        from; anyres: each image's size; Gemma 3: the image positions that attend both ways)."""
        model_type = self.llava.config.model_type
        is_image = input_ids == self.image_token_id
        inputs = {"pixel_values": pixel_values.to(self.llava.dtype)}
        if model_type in NATIVE_RESOLUTION_MODEL_TYPES:
            if image_grid_thw is None:
                raise ValueError(f"a {model_type} model needs each image's image_grid_thw, as its processor gives it")
            inputs |= {"image_grid_thw": image_grid_thw, "mm_token_type_ids": is_image.int()}
        if model_type in ANYRES_MODEL_TYPES:
            if image_sizes is None:
                raise ValueError("an anyres model needs each image's (height, width): give the processor's image_sizes")
            inputs["image_sizes"] = image_sizes
        if model_type in IMAGE_ATTENTION_MODEL_TYPES:
            inputs["token_type_ids"] = is_image.long()
        return inputs


def deepstack_inputs(ids: torch.Tensor, mask: torch.Tensor, is_image: torch.Tensor, visual: torch.Tensor,
                     runs: list[tuple[int, int]], grid_thw: torch.Tensor | None, width: int) -> dict[str, Any]:  # fmt: skip
    """Qwen3-VL's prompt: its ids with the pooled merged tokens and DeepStack sets as pre-encoded image outputs,
    which its forward splices (the sets at the image positions of their decoder layers), and what it makes
    the M-RoPE ids from (no `grid_thw`, MQT's queries: text ids); the stock model takes no DeepStack sets beside
    embeddings."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures  # noqa: PLC0415

    sizes = [kept for _, kept in runs]
    levels = [tuple(level.split(sizes)) for level in visual.split(width, dim=-1)]
    encoded = BaseModelOutputWithDeepstackFeatures(pooler_output=levels[0], deepstack_features=levels[1:])
    inputs = {"input_ids": ids, "attention_mask": mask, "mm_encoder_outputs": {"image": encoded}}
    if grid_thw is None:  # MQT's query tokens: text ids on every M-RoPE axis, as training gives them
        return inputs | {"position_ids": (mask.long().cumsum(1) - 1).clamp(min=0)}
    return inputs | {"mm_token_type_ids": is_image.int(), "image_grid_thw": grid_thw}


def check_image_runs(input_ids: torch.Tensor, image_token_id: int, runs: list[tuple[int, int]]) -> None:
    """Refuse a prompt whose image tokens are not the (full) count of its images (`runs`), which the shrinking to
    the scale would cut in the wrong places."""
    held, wanted = int((input_ids == image_token_id).sum()), sum(full for full, _ in runs)
    if held != wanted:
        raise ValueError(
            f"the prompt holds {held} image tokens for {len(runs)} image(s) that stand for {wanted} in all "
            f"({[full for full, _ in runs]} each): expand every image to its full count (an MQT model's image to its "
            "M query tokens, as training's data does), or give the pixels of exactly the prompt's images"
        )


def run_keep_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, runs: list[tuple[int, int]]
) -> torch.Tensor:
    """True on the real tokens that survive shrinking each image run, in order over the rows, from its full
    count to its kept count (`runs`: (full, kept) per image; `image_keep_mask` when every image is alike)."""
    if len(set(runs)) == 1:
        return image_keep_mask(input_ids, attention_mask, image_token_id, *runs[0])
    keep = attention_mask.bool().clone()
    images, left, position, kept = iter(runs), 0, 0, 0
    for row, column in (input_ids == image_token_id).nonzero().tolist():  # row-major: image runs in order
        if column == 0 or input_ids[row, column - 1] != image_token_id or left == 0:
            full, kept = next(images)
            left, position = full, 0
        keep[row, column] &= position < kept
        left, position = left - 1, position + 1
    return keep


def keep_left_padded(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens of every row, left-padded to the longest: (ids, mask). The pad id is never read."""
    rows = [input_ids[row][keep[row]] for row in range(input_ids.shape[0])]
    width = max(len(row) for row in rows)
    ids = input_ids.new_zeros(len(rows), width)
    mask = attention_mask.new_zeros(len(rows), width)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def adapter_order(spec: MatryoshkaSpec) -> list[str]:
    """Adapters in training's order (mtrain/model/scale_lora.py: `adapter_names`); the first carries
    `modules_to_save`."""
    per_scale = [f"scale_{s}" for s in spec.scales]
    return [SHARED_ADAPTER, *per_scale] if spec.strategy == "shared_plus_per_scale" else per_scale


def load_scale_adapters(folder: Path, spec: MatryoshkaSpec, dtype: torch.dtype) -> nn.Module:
    """The base model with every adapter of export/adapter loaded under its own name (stock PEFT)."""
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoModelForImageTextToText  # noqa: PLC0415

    names = adapter_order(spec)
    adapters = folder / "adapter"
    missing = [name for name in names if not (adapters / name / "adapter_config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{adapters} lacks the adapters {missing}; export the checkpoint again")
    base = folder / "base"
    if not base.is_dir():  # the base the run started from, as the adapter records it
        base = Path(json.loads((adapters / names[0] / "adapter_config.json").read_text())["base_model_name_or_path"])
    model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, trust_remote_code=spec.token_mode == "mqt"),
        adapters / names[0],
        adapter_name=names[0],
    )
    for name in names[1:]:
        model.load_adapter(adapters / name, adapter_name=name)
    return model


def load_projection(folder: Path, spec: MatryoshkaSpec, dtype: torch.dtype) -> nn.Module | None:
    """The embedding head's projection (`projection_dim` > 0), as trained."""
    if spec.embedding is None or not (folder / HEAD_WEIGHTS_FILE).is_file():
        return None
    from safetensors.torch import load_file  # noqa: PLC0415

    state = load_file(str(folder / HEAD_WEIGHTS_FILE))
    weight = state["projection.weight"]
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
    projection.weight.data.copy_(weight)
    return projection.eval()


class ImagePromptProcessor:
    """A processor's prompt side (`apply_chat_template`, a call on images and text, `decode`) from the tokenizer
    and the image processor alone, for `PROMPT_BUILT_MODEL_TYPES`. It expands each image token of the text (where
    the trained chat template puts an image) to the image's tokens, as the stock processor or training does: Qwen's
    merged tokens, t*h*w / merge_size^2 of its `image_grid_thw`; OneVision's anyres count for the picture's size
    (`mtrain.model.anyres.image_tokens`); Gemma 3's `mm_tokens_per_image`. It gives the image processor's pixels
    (with Qwen's `image_grid_thw`, OneVision's `image_sizes`)."""

    def __init__(self, tokenizer: Any, image_processor: Any, config: Any) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The conversation as text, by the tokenizer's chat template (the one the model trained with)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def __call__(self, images: Any = None, text: str = "", return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        images = [] if images is None else images if isinstance(images, list) else [images]
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the text has {len(pieces) - 1} {self.image_token} for {len(images)} images")
        pixels: dict[str, torch.Tensor] = {}
        if images:
            processed = self.image_processor(images=images, return_tensors=return_tensors)
            pixels = {name: processed[name] for name in PROMPT_INPUTS if name in processed}
            counts = self.token_counts(pixels, images)
            text = pieces[0] + "".join(
                self.image_token * count + piece for count, piece in zip(counts, pieces[1:], strict=True)
            )
        return {**self.tokenizer(text, return_tensors=return_tensors), **pixels}

    def token_counts(self, pixels: dict[str, torch.Tensor], images: list[Any]) -> list[int]:
        """Each image's token count in the prompt."""
        model_type = self.config.model_type
        if model_type in NATIVE_RESOLUTION_MODEL_TYPES:
            merge = self.image_processor.merge_size
            return (pixels["image_grid_thw"].prod(-1) // (merge * merge)).tolist()
        if model_type in ANYRES_MODEL_TYPES:
            return [image_tokens(self.config, (image.height, image.width)) for image in images]
        return [self.config.mm_tokens_per_image] * len(images)

    def decode(self, token_ids: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(token_ids, **kwargs)


def load_processor(folder: str | Path, config: Any) -> Any:
    """The processor of an export's `model/` folder for a model of `config`: `AutoProcessor`, or for Qwen-VL,
    OneVision and Gemma 3 (`PROMPT_BUILT_MODEL_TYPES`) its tokenizer and image processor as an
    `ImagePromptProcessor`."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer  # noqa: PLC0415

    if config.model_type in PROMPT_BUILT_MODEL_TYPES:
        return ImagePromptProcessor(
            AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder), config
        )
    return AutoProcessor.from_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    """`python -m mtrain.infer EXPORT --image PICTURE --prompt TEXT [--scale S]`: answer with the trained chat
    template, each image at S visual tokens (default: the export's default scale)."""
    import argparse  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m mtrain.infer", description=main.__doc__)
    parser.add_argument("export", help="the folder `mtrain export` (or the end of training) wrote")
    parser.add_argument("--image", required=True, help="a picture file")
    parser.add_argument("--prompt", required=True, help="the question about it")
    parser.add_argument("--scale", type=int, default=None, help="visual tokens per image (a trained scale)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    model = MatryoshkaModel.from_export(args.export)
    try:
        model.check_generates()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    processor = load_processor(Path(args.export) / "model", model.llava.config)
    print(answer(model, processor, Image.open(args.image).convert("RGB"), args.prompt, args.scale, args.max_new_tokens))
    return 0


def answer(model: MatryoshkaModel, processor: Any, image: Any, prompt: str, scale: int | None,
           max_new_tokens: int) -> str:  # fmt: skip
    """The greedy answer to one question about one picture, asked with the trained chat template: an image part
    (which the template writes as the family's image token, `<image>` or Qwen's `<|image_pad|>` in its markers)
    and the question on the next line."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"\n{prompt}"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    new_tokens = model.generate(**inputs, scale=scale, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(new_tokens[0], skip_special_tokens=True)


if __name__ == "__main__":
    raise SystemExit(main())
