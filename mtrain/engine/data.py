"""From the config and the built model to this rank's batches: the data wiring of every objective.

Every loader the trainer takes is a `Batches`: an endless iterator of collated batches with a
per-rank state for checkpoints and counters to log.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Protocol

from mtrain.config.schema import TrainConfig
from mtrain.launch.env import WorldInfo


class Batches(Protocol):
    """What the trainer and the checkpointer need of a loader."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def __next__(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, all_ranks: list[dict[str, Any]]) -> None: ...

    def metrics(self) -> dict[str, float]:
        """Counters to sum over ranks and log (bad samples by reason, samples, dropped)."""
        ...


class ReadyBatches:
    """Batches collated beforehand (benchmarks, tests), taken in order: no counters, no position to checkpoint."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self._batches = iter(batches)

    def __iter__(self) -> ReadyBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._batches)

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("ready batches have no data position to checkpoint; train from a loader")

    def load_state_dict(self, all_ranks: list[dict[str, Any]]) -> None:
        raise NotImplementedError("ready batches have no data position to restore; train from a loader")


def sample_rules(data: Any, tokenizer: Any) -> Any:
    """How samples are built and checked, as a `data` section sets it; conversations are rendered by
    `tokenizer`'s chat template (training, evaluation and `mtrain data validate/inspect --config`)."""
    from data_pipeline.chat_template import ConversationTemplate  # noqa: PLC0415
    from data_pipeline.formats import SampleRules  # noqa: PLC0415

    return SampleRules(
        caption_prompt=data.prompt,
        require_image=data.require_image,
        max_image_pixels=data.max_image_pixels,
        chat=ConversationTemplate.from_tokenizer(tokenizer),
    )


def loader_settings(cfg: TrainConfig, tokenizer: Any) -> Any:
    """The loader's stages as the config's `data` section sets them (every batch form); conversations
    are rendered by `tokenizer`'s chat template."""
    from data_pipeline.loader import LoaderSettings  # noqa: PLC0415
    from data_pipeline.shards import ShardCache  # noqa: PLC0415

    data = cfg.data
    return LoaderSettings(
        sources=tuple(data.source_list),
        batch_size=data.micro_batch_size,
        seed=cfg.run.seed,
        num_workers=data.num_workers,
        shuffle=data.shuffle,
        packing=data.packing,
        pack_window=data.pack_window,
        epoch_mode=data.epoch_mode,
        max_bad_fraction=data.max_bad_fraction,
        bad_fraction_min_samples=data.bad_fraction_min_samples,
        rules=sample_rules(data, tokenizer),
        cache=ShardCache(
            folder=data.shard_cache_dir, retries=data.remote_retries, max_bytes=int(data.shard_cache_gb * 2**30)
        ),
    )


def token_spec(cfg: TrainConfig, built: Any) -> Any:
    """How documents become tokens for this model: its tokenizer and image token, `data.max_len`, and its
    family's markers around every image (Qwen's <|vision_start|> ... <|vision_end|>, Gemma 3's
    \n\n<start_of_image> ... <end_of_image>\n\n)."""
    from data_pipeline.tokenize import TokenSpec  # noqa: PLC0415

    markers = built.family.image_markers if built.family is not None else ("", "")
    return TokenSpec.with_markers(built.tokenizer, built.image_token_id, cfg.data.max_len, markers)


def image_token_counter(cfg: TrainConfig, built: Any) -> Any:
    """Each image's own visual-token count from its (height, width), for models whose images differ in count:
    Qwen at native resolution (the processor's resize rule), anyres families by the image's size (without MQT,
    whose images are M queries each); None where every image has the data's expansion (`built.visual_tokens`).
    The loader reads each image's size from its header when planning, so rows are packed at the real counts."""
    if getattr(built.image_processor, "variable_patches", False):
        return built.image_processor.size_tokens
    family = built.family
    if family is not None and family.counts_by_image_size and cfg.matryoshka.tokens.mode != "mqt":
        return functools.partial(_size_tokens, family, built.model.config)
    return None


def _size_tokens(family: Any, config: Any, size: tuple[int, int]) -> int:
    return family.scale_tokens(config, None, size)


def build_data_loader(cfg: TrainConfig, built: Any, world: WorldInfo, form: Any = None) -> Any:
    """The StreamingLoader of this rank: tokenizer, image processor and visual-token count from the model.

    `form` makes other batches than documents (pairs: `build_pair_loader`)."""
    from data_pipeline.loader import build_loader, torch_distributed_gather, torch_distributed_sync  # noqa: PLC0415

    return build_loader(
        loader_settings(cfg, built.tokenizer),
        world.rank,
        world.world_size,
        token_spec(cfg, built),
        built.image_processor,
        built.visual_tokens,
        sync=torch_distributed_sync(),
        # Shards without an index entry are scanned once over all ranks (every rank builds a loader here).
        gather=torch_distributed_gather() if world.world_size > 1 else None,
        form=form,
        image_tokens=image_token_counter(cfg, built) if form is None else None,
    )


def pair_spec(cfg: TrainConfig, built: Any) -> Any:
    """How pair sides become tokens and pixels for this config and model."""
    from data_pipeline.pairs import PairSpec  # noqa: PLC0415

    tokens = token_spec(cfg, built)
    return PairSpec(
        built.tokenizer,
        built.image_token_id,
        built.visual_tokens,
        cfg.data.max_len,
        # Only the shape of a side without images, (0, 3, S, S); a Qwen tower has no one size (its images are patches).
        getattr(built.model.config.vision_config, "image_size", 0),
        cfg.task.contrastive.query_instruction,
        tokens.image_start_ids,
        tokens.image_end_ids,
        tokens.image_start_text,
        tokens.image_end_text,
        # Qwen's native resolution: each image its own count, from its header's size.
        built.image_processor.size_tokens if getattr(built.image_processor, "variable_patches", False) else None,
    )


def build_pair_loader(cfg: TrainConfig, built: Any, world: WorldInfo) -> Any:
    """(query, positive[, negative]) pair batches of this rank: the staged loader with the pair form."""
    from data_pipeline.pairs import PairForm  # noqa: PLC0415

    return build_data_loader(cfg, built, world, form=PairForm(pair_spec(cfg, built)))
