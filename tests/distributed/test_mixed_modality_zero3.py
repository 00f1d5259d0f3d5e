"""Under real 2-rank ZeRO-3 (every parameter sharded), one rank holds only text-only micro-batches
and the other only image batches, step after step. The text-only rank runs the vision path on a
blank stand-in image times zero, so both ranks gather and reduce the same parameters: the run ends
(no hang; the test has a timeout) and its losses equal a 1-rank run of the same global batch.

Then both ranks answer prompts by greedy generation with the engine's module, the text rank's answers
ending before the image rank's: they step together (no hang) and give the 1-rank run's answers."""

from __future__ import annotations

import json

import pytest

from data_pipeline.sample_data import write_sample_shards
from tests.conftest import BIN, REPO, free_port, launch_env, run
from tests.data_factory import write_mixed_modality_shard

pytestmark = pytest.mark.timeout(300)

WORKER = str(REPO / "tests/distributed/mixed_modality_worker.py")
STEPS = 4
TASKS = {"lm": [], "m3_scale_lora": ["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16,64]",
                                     "model.lora.strategy=shared_plus_per_scale"]}  # fmt: skip


@pytest.mark.parametrize("task", sorted(TASKS))
def test_text_only_and_image_ranks_stay_in_step_and_match_one_rank(tmp_path, task):
    text_shard = tmp_path / "text-000000.tar"
    has_image = write_mixed_modality_shard(text_shard, count=32, text_only_every=1)
    assert not any(has_image.values())
    image_shard = write_sample_shards(tmp_path / "images", num_shards=1, samples_per_shard=32)[0]
    common = [
        f"run.max_steps={STEPS}", "logging.progress=false", "checkpoint.save_at_end=false",
        "zero.param_persistence_threshold=0", "model.lora.dropout=0.0", "data.micro_batch_size=4",
        "model.freeze.vision_tower=false", f"data.shards={image_shard}", *TASKS[task],
    ]  # fmt: skip
    outputs = {}
    for role, ranks, accum in (("split", 2, 1), ("joined", 1, 2)):
        out = tmp_path / f"{role}.json"
        launcher = [str(BIN / "python")]
        if ranks > 1:
            launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
        args = [WORKER, str(out), str(text_shard), str(image_shard), role, f"run.dir={tmp_path / role}"]
        proc = run([*launcher, *args, *common, f"optim.grad_accum_steps={accum}"], tmp_path, 240, launch_env())
        assert proc.returncode == 0
        outputs[role] = json.loads(out.read_text())
    losses = {role: output["losses"] for role, output in outputs.items()}
    assert len(losses["split"]) == STEPS
    assert losses["split"] == pytest.approx(losses["joined"], rel=1e-5, abs=1e-6)
    assert losses["split"][-1] < losses["split"][0]
    answers = outputs["split"]["answers"]
    assert [len(row) for row in answers["text"]] == [2, 2] and [len(row) for row in answers["image"]] == [6, 6]
    assert answers == outputs["joined"]["answers"]
