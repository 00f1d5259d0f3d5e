"""Generated-answer accuracy in one process on the tiny model: prompts cut before the first answer, the
comparison, each rank's share of the samples, the training model's scale adapters routed as an export's are
switched, and a freshly initialised model answering nothing right. A trained model's figure is checked in
tests/integration/test_budget_curves.py; ranks stepping together under ZeRO-3 in
tests/distributed/test_mixed_modality_zero3.py and tests/integration/test_checkpoint_resume.py."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.sample_data import write_conversation_shards
from mtrain.checkpoint.export import matryoshka_metadata
from mtrain.config import load_config
from mtrain.eval.generation import generation_model, prompt_batches, rank_quota, same_answer
from mtrain.eval.held_out import held_out_loader, one_pass
from mtrain.infer import MatryoshkaModel, MatryoshkaSpec
from mtrain.launch.env import WorldInfo
from tests.unit.test_in_loop_eval import SINGLE, build, evaluate_untouched
from tests.unit.test_infer import assert_rows_equal, per_scale_logits, prompt_of
from tests.unit.test_matryoshka_task import SCALES, make_batch, make_task

# The floor a trained model's generated-answer accuracy clears and a freshly initialised one does not: the digits
# of tests/integration/test_budget_curves.py are one word of ten (chance 0.1); a random tiny model answers none.
GENERATED_ACCURACY_FLOOR = 0.3


def test_prompts_end_before_the_first_answer_and_a_fresh_model_answers_none(tmp_path):
    write_conversation_shards(tmp_path, num_shards=1, samples_per_shard=6, seed=2)
    held_out = str(tmp_path / "chat-000000.tar")
    overrides = [f"eval.shards={held_out}", "eval.scales=[4,64]", "eval.generate_samples=5", "eval.max_new_tokens=4",
                 "data.micro_batch_size=4", "data.max_len=128"]  # fmt: skip
    cfg, built, task = build("tiny.yaml", overrides)
    tokenizer = built.tokenizer
    prompts = list(prompt_batches(one_pass(held_out_loader(cfg, built, SINGLE, held_out)), 5, built))
    assert [len(p.references) for p in prompts] == [4, 1]  # the quota stops inside the second batch
    first = prompts[0]
    ids, mask = first.inputs["input_ids"], first.inputs["attention_mask"]
    assert first.inputs["pixel_values"].shape[0] == 4 and int((ids == built.image_token_id).sum()) == 4 * 64
    for row, reference in enumerate(first.references):
        prompt = tokenizer.decode(ids[row][mask[row].bool()])
        assert prompt.endswith("What is drawn? ASSISTANT:") and bool(mask[row, -1])  # left-padded
        assert reference[-1] == tokenizer.eos_token_id
        answer = tokenizer.decode(reference, skip_special_tokens=True).strip()
        assert answer.startswith("A ") and answer.endswith(".")
        # The comparison: the reference generated, then end-of-text and padding, is right; one word off is not.
        assert same_answer([*reference, tokenizer.pad_token_id], reference, tokenizer, tokenizer.eos_token_id)
        assert not same_answer(reference[:-2] + reference[-1:], reference, tokenizer, tokenizer.eos_token_id)

    metrics = evaluate_untouched(cfg, built, task)  # the RNG and every train mode as they were
    for scale in (4, 64):
        assert metrics[f"eval/generated_answers/scale_{scale}"] == 5.0
        assert metrics[f"eval/generated_accuracy/scale_{scale}"] < GENERATED_ACCURACY_FLOOR  # random: none right


def test_each_rank_answers_its_share_of_the_first_samples():
    # The loader gives rank r positions r, r+W, ... of the shard order: the quotas cover the first N exactly.
    for samples in (1, 5, 17):
        for ranks in range(1, min(samples, 4) + 1):
            quotas = [rank_quota(samples, WorldInfo(r, ranks, r, ranks, "127.0.0.1", 0, "none")) for r in range(ranks)]
            assert sum(quotas) == samples and max(quotas) - min(quotas) <= 1
    assert [rank_quota(17, WorldInfo(r, 2, r, 2, "127.0.0.1", 0, "none")) for r in (0, 1)] == [9, 8]


@pytest.mark.parametrize(("mode", "strategy", "scales"), [("m3", "shared_plus_per_scale", [1, 16]),
                                                           ("mqt", "per_scale", [2, 32])])  # fmt: skip
def test_training_model_routes_its_scale_adapters_as_the_task_does(mode, strategy, scales):
    """The in-loop generation runs the training model, whose scale adapters are all active and masked per token:
    through MatryoshkaModel with the run's routing it gives the task's own per-scale logits, and the greedy token
    generated from them (with the KV cache) is their argmax."""
    task, built = make_task(mode, strategy)
    cfg = load_config(None, [f"matryoshka.tokens.mode={mode}", f"matryoshka.tokens.scales={SCALES[mode]}",
                             "model.lora.enabled=true", f"model.lora.strategy={strategy}"])  # fmt: skip
    assert MatryoshkaSpec.from_block(matryoshka_metadata(cfg)).strategy == strategy
    batch = make_batch(built)
    reference = per_scale_logits(task.eval(), batch, scales)
    model = generation_model(cfg, task, built.scale_routing)
    assert isinstance(model, MatryoshkaModel) and model.routing is built.scale_routing
    for scale in scales:
        inputs = model.scaled_inputs(**prompt_of(batch), scale=scale)
        logits = model.logits(**prompt_of(batch), scale=scale)
        assert_rows_equal(logits, inputs["attention_mask"], reference[scale])
        new = model.generate(**prompt_of(batch), scale=scale, max_new_tokens=3, do_sample=False)
        assert torch.equal(new[:, 0], logits[:, -1].argmax(-1))
    assert built.scale_routing.row_scales is None  # cleared after each call: training routes its own rows
