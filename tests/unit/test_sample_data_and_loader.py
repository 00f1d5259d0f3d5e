import pytest
import torch
import webdataset as wds

from data_pipeline.loader import IGNORE_INDEX, CaptionStream, ResumableLoader, TextSpec, expand_shards, split_shards
from mtrain.model.build import tiny_image_processor
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer


def make_stream(pattern: str, rank: int = 0, world_size: int = 1, batch_size: int = 4) -> CaptionStream:
    tokenizer = build_tiny_tokenizer()
    text = TextSpec(
        tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), visual_tokens=64, max_len=96, prompt="<image>\n"
    )
    return CaptionStream(pattern, rank, world_size, batch_size, text, tiny_image_processor(32), seed=0)


def test_plain_webdataset_reads_sample_shards(shards_pattern):
    samples = list(wds.WebDataset(expand_shards(shards_pattern), shardshuffle=False).decode("pil"))
    assert len(samples) == 4 * 48
    first = samples[0]
    assert first["jpg"].size == (64, 64)
    assert first["txt"].startswith("a ") and first["txt"].endswith(".")


def test_batch_expands_image_and_masks_labels(shards_pattern):
    batch = next(iter(make_stream(shards_pattern)))
    image_id = build_tiny_tokenizer().convert_tokens_to_ids(IMAGE_TOKEN)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    for row in range(4):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert int((ids == image_id).sum()) == 64
        assert (labels[ids == image_id] == IGNORE_INDEX).all()
        assert (labels[mask == 0] == IGNORE_INDEX).all()
        learned = labels != IGNORE_INDEX
        assert learned.sum() >= 4  # the caption words and EOS
        assert (labels[learned] == ids[learned]).all()


def test_ranks_read_disjoint_shards(shards_pattern):
    keys = []
    for rank in range(2):
        stream = make_stream(shards_pattern, rank=rank, world_size=2)
        keys.append({k for _, batch in zip(range(24), stream, strict=False) for k in batch["keys"]})
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_too_few_shards_for_consumers_is_a_clear_error():
    with pytest.raises(ValueError, match="2 shards cannot feed 2 ranks x 2 workers"):
        split_shards(["a", "b"], rank=0, world_size=2, worker=0, num_workers=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_continues_exactly(shards_pattern, num_workers):
    def loader() -> ResumableLoader:
        stream = make_stream(shards_pattern, rank=1, world_size=2)
        stream.shuffle_buffer = 16
        return ResumableLoader(stream, num_workers)

    first = loader()
    taken = [next(first) for _ in range(30)]  # past the end of the first epoch (48 samples / 4)
    resumed = loader()
    loader_state = {**first.state_dict(), "batches_taken": 17}
    resumed.load_state_dict([{**loader_state, "rank": 0}, loader_state])  # every saved rank's state
    assert loader_state["batches_taken"] == 17
    for expected in taken[17:]:
        got = next(resumed)
        assert got["keys"] == expected["keys"]
        for name in ("input_ids", "labels", "attention_mask", "pixel_values"):
            assert torch.equal(got[name], expected[name])
