import torch
import webdataset as wds

from data_pipeline.shards import expand_shards
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer
from tests.data_factory import make_loader

BATCH_TENSORS = ("input_ids", "labels", "attention_mask", "pixel_values")


def test_plain_webdataset_reads_sample_shards(shards_pattern):
    samples = list(wds.WebDataset(expand_shards(shards_pattern), shardshuffle=False).decode("pil"))
    assert len(samples) == 4 * 48
    first = samples[0]
    assert first["jpg"].size == (64, 64)
    assert first["txt"].startswith("a ") and first["txt"].endswith(".")


def test_batch_expands_image_and_masks_labels(shards_pattern):
    batch = next(make_loader(shards_pattern))
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


def test_ranks_split_every_epoch_exactly(shards_pattern):
    """Two ranks: disjoint keys, together every key once, the same batch count (48*4 / 2 / 4 = 24)."""
    keys = []
    for rank in range(2):
        loader = make_loader(shards_pattern, rank=rank, world_size=2)
        batches = [next(loader) for _ in range(24)]
        keys.append([k for batch in batches for k in batch["keys"]])
        assert loader.epoch == 0
        assert next(loader)["keys"] and loader.epoch == 1
    assert len(keys[0]) == len(keys[1]) == 96
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 4 * 48


def test_batches_do_not_depend_on_workers_and_resume_exactly(shards_pattern):
    reference = make_loader(shards_pattern, rank=1, world_size=2)
    expected = [next(reference) for _ in range(30)]  # past the end of the first epoch (24 batches)
    for workers in (0, 2):
        first = make_loader(shards_pattern, rank=1, world_size=2, num_workers=workers)
        for batch in expected[:17]:
            assert next(first)["keys"] == batch["keys"]
        resumed = make_loader(shards_pattern, rank=1, world_size=2, num_workers=workers)
        untouched_rank0 = make_loader(shards_pattern, rank=0, world_size=2)  # a whole checkpoint holds every rank
        resumed.load_state_dict([untouched_rank0.state_dict(), first.state_dict()])
        for batch in expected[17:]:
            got = next(resumed)
            assert got["keys"] == batch["keys"]
            for name in BATCH_TENSORS:
                assert torch.equal(got[name], batch[name])
