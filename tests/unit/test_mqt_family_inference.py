"""MQT after a family's own projector, read back and generated from (tiny presets, one process).

mtrain.infer on the `mtrain_mqt_<family>` export (loaded with trust_remote_code, as users load it) and on the
training model (what the in-loop evaluation and `mtrain generate` on a checkpoint run) gives the training
task's logits at every trained query count, its greedy tokens are the step-by-step argmax of those logits, and
the export answers as the training model does. The query tokens' positions matter: read as an image grid
(Qwen's M-RoPE) or causal among themselves (Gemma 3), the logits move. The export folder is also a `model.path`
that passes the checks before any process group and continues training from the same logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.checkpoint.export import _save_hf_folder, matryoshka_metadata
from mtrain.infer import MatryoshkaModel, MatryoshkaSpec
from tests.family_checks import documents as family_documents
from tests.family_checks import lora_task
from tests.unit.test_family_objectives import MARKERS, MQT_SCALES, QUERIES, family_pixels, mqt_config

pytestmark = pytest.mark.timeout(300)

NEW_TOKENS = 3


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    return ids, torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])


def prompts_of(built, preset: str) -> tuple[dict, dict]:
    """(the documents as a right-padded training batch, their prompts up to the first learned token, left-padded,
    as mtrain.infer takes them: every image M query tokens, the family's own image inputs)."""
    docs = family_documents(built, *MARKERS[preset])[:2]  # one image, then two
    pixels, sizes = family_pixels(built, sum(images for _, _, images in docs))
    width, pad = max(len(ids) for ids, _, _ in docs), built.tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in docs]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels, _ in docs]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in docs]),
        "pixel_values": pixels,
    }
    if sizes:
        batch["image_sizes"] = sizes
    asked = [ids[: next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)] for ids, labels, _ in docs]
    input_ids, attention_mask = left_padded(asked, pad)
    prompt = {"input_ids": input_ids, "attention_mask": attention_mask}
    prompt |= built.family.prompt_images(built.model.config, pixels, built.visual_grid)
    if sizes:
        prompt["image_sizes"] = torch.tensor(sizes)
    return batch, prompt


def full_rows(batch: dict, built) -> dict:
    """The whole documents as mtrain.infer's prompt (right-padding read by the mask)."""
    prompt = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    prompt |= built.family.prompt_images(built.model.config, batch["pixel_values"], built.visual_grid)
    if "image_sizes" in batch:
        prompt["image_sizes"] = torch.tensor(batch["image_sizes"])
    return prompt


def export(tmp_path, task, built, cfg) -> MatryoshkaModel:
    """The merged model's export folder (model/ and mtrain.json), loaded as users load it."""
    _save_hf_folder(task.model, built, tmp_path / "model", mqt_scale=MQT_SCALES[-1])
    (tmp_path / "mtrain.json").write_text(json.dumps({"matryoshka": matryoshka_metadata(cfg)}))
    loaded = MatryoshkaModel.from_export(tmp_path)
    assert loaded.llava.config.model_type == f"mtrain_mqt_{built.family.model_type}"
    assert "mtrain" not in type(loaded.llava).__module__  # the folder's own copy of the remote code
    return loaded


def task_logits(task, batch: dict, scale: int) -> list[torch.Tensor]:
    """Each row's logits over its real tokens at `scale`, from the task's own forward."""
    with torch.no_grad():
        logits, layout = task.run(batch, [scale] * batch["input_ids"].shape[0])
    real = layout.token_scales > 0
    return [logits[row][real[row]] for row in range(logits.shape[0])]


def assert_logits_equal(model: MatryoshkaModel, prompt: dict, scale: int, want: list[torch.Tensor]) -> None:
    """Every real token's logits of mtrain.infer (its rows left-padded) equal `want` (`task_logits`)."""
    got = model.logits(**prompt, scale=scale)
    mask = model.scaled_inputs(**prompt, scale=scale)["attention_mask"].bool()
    for row, wanted in enumerate(want):
        torch.testing.assert_close(got[row][mask[row]], wanted, rtol=1e-4, atol=1e-5)


def assert_logits_equal_the_tasks(model: MatryoshkaModel, task, batch: dict, prompt: dict, scale: int) -> None:
    assert_logits_equal(model, prompt, scale, task_logits(task, batch, scale))


def greedy_by_argmax(model: MatryoshkaModel, prompt: dict, scale: int) -> torch.Tensor:
    """NEW_TOKENS greedy tokens, each the argmax of the whole growing prompt's last logits (no cache)."""
    prompt = dict(prompt)
    picked = []
    for _ in range(NEW_TOKENS):
        token = model.logits(**prompt, scale=scale)[:, -1].argmax(-1, keepdim=True)
        picked.append(token)
        prompt["input_ids"] = torch.cat([prompt["input_ids"], token], dim=1)
        prompt["attention_mask"] = torch.cat([prompt["attention_mask"], torch.ones_like(token)], dim=1)
    return torch.cat(picked, dim=1)


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-llava-onevision", "tiny-gemma3"])
def test_export_and_training_model_generate_at_every_query_count_as_the_task(tmp_path, preset):
    cfg = mqt_config(preset, strategy="shared")
    task, built = lora_task(cfg)
    task.model = task.model.merge_and_unload().eval()
    batch, prompt = prompts_of(built, preset)
    trained = MatryoshkaModel(task.model, MatryoshkaSpec.from_block(matryoshka_metadata(cfg)))
    exported = export(tmp_path, task, built, cfg)
    greedy = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    for scale in MQT_SCALES:
        for model in (trained, exported):
            assert_logits_equal_the_tasks(model, task, batch, full_rows(batch, built), scale)
        answer = exported.generate(**prompt, scale=scale, **greedy)
        assert torch.equal(answer, greedy_by_argmax(trained, prompt, scale)), scale
        assert torch.equal(answer, trained.generate(**prompt, scale=scale, **greedy)), scale


class QueriesAsAGrid(MatryoshkaModel):
    """The mutation for Qwen: each image's query tokens given the M-RoPE ids of a 1 x m image grid (the rule of an
    image's own tokens), not text ids."""

    def queries_at_scale(self, pixel_values, image_grid_thw, scale, image_sizes):
        visual, runs, _ = super().queries_at_scale(pixel_values, image_grid_thw, scale, image_sizes)
        merge = self.llava.config.vision_config.spatial_merge_size
        return visual, runs, torch.tensor([[1, merge, merge * kept] for _, kept in runs])


class CausalQueries(MatryoshkaModel):
    """The mutation for Gemma 3: its query tokens causal among themselves (no image block)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.family_type = "gemma3 read as a causal text model"


@pytest.mark.parametrize(("preset", "mutation"), [("tiny-qwen2-vl", QueriesAsAGrid), ("tiny-qwen3-vl", QueriesAsAGrid),
                                                  ("tiny-gemma3", CausalQueries)])  # fmt: skip
def test_wrong_query_positions_move_the_logits(preset, mutation):
    cfg = mqt_config(preset, strategy="shared")
    task, built = lora_task(cfg)
    task.model = task.model.merge_and_unload().eval()
    batch, _ = prompts_of(built, preset)
    scale = MQT_SCALES[1]
    model = mutation(task.model, MatryoshkaSpec.from_block(matryoshka_metadata(cfg)))
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        assert_logits_equal_the_tasks(model, task, batch, full_rows(batch, built), scale)


def test_an_mqt_export_folder_is_a_model_path_that_continues_from_its_logits(tmp_path):
    """`model.path` (and `checkpoint.init_from`, which resolves an export to its model folder) at a
    `mtrain_mqt_qwen2_vl` export: checked before any process group (MQT with the folder's head shape), then built
    as the stock family with the folder's trained head, whose task gives the exported task's logits at every
    query count."""
    from mtrain.checkpoint.init_from import init_from_start
    from mtrain.launch.model_checks import model_problems
    from mtrain.model.build import build_model
    from mtrain.model.mqt_head import mqt_head
    from mtrain.task.registry import build_task
    from tests.unit.test_model_checks import folder_config

    preset = "tiny-qwen2-vl"
    cfg = mqt_config(preset, strategy="shared")
    task, built = lora_task(cfg)
    task.model = task.model.merge_and_unload().eval()
    _save_hf_folder(task.model, built, tmp_path / "model", mqt_scale=MQT_SCALES[-1])
    assert init_from_start(tmp_path, "train").model == tmp_path / "model"
    scales, size = f"matryoshka.tokens.scales=[{','.join(map(str, MQT_SCALES))}]", "model.image_size=[32,32]"
    mqt = ["matryoshka.tokens.mode=mqt", f"matryoshka.tokens.mqt_queries={QUERIES}", scales, size]
    folder = tmp_path / "model"
    assert model_problems(folder_config(folder, *mqt)) == []
    (refused,) = model_problems(folder_config(folder, size))
    assert "this is an MQT model" in refused and "set matryoshka.tokens.mode=mqt" in refused
    (refused,) = model_problems(folder_config(folder, "matryoshka.tokens.mode=mqt", "matryoshka.tokens.mqt_queries=16",
                                              scales, size))  # fmt: skip
    assert f"set matryoshka.tokens.mqt_queries={QUERIES} (the config has 16)" in refused
    again = folder_config(folder, *mqt, "matryoshka.tokens.layout=packed")
    reloaded = build_model(again.model, torch.float32, None, seed=1, tokens=again.matryoshka.tokens)
    assert reloaded.family.model_type == "qwen2_vl" and reloaded.visual_tokens == QUERIES
    torch.testing.assert_close(mqt_head(reloaded.model).queries, mqt_head(task.model).queries, rtol=0, atol=0)
    continued = build_task(again, reloaded, rank=0).eval()
    batch, _ = prompts_of(built, preset)
    rows = batch["input_ids"].shape[0]
    with torch.no_grad():
        for scale in MQT_SCALES:
            torch.testing.assert_close(continued.run(batch, [scale] * rows)[0], task.run(batch, [scale] * rows)[0])


def test_in_loop_generation_answers_at_every_query_count(tmp_path):
    """`eval.generate_samples` with MQT after Qwen3-VL's projector and per-scale LoRA: the loader's prompts (every
    image M query tokens, Qwen's patch sequence) answer each sample at every trained query count."""
    from data_pipeline.sample_data import write_conversation_shards
    from mtrain.eval.generation import prompt_batches
    from mtrain.eval.held_out import held_out_loader, one_pass
    from tests.unit.test_in_loop_eval import SINGLE, build, evaluate_untouched

    write_conversation_shards(tmp_path, num_shards=1, samples_per_shard=4, seed=2)
    held_out = str(tmp_path / "chat-000000.tar")
    cfg, built, task = build("tiny.yaml", ["model.preset=tiny-qwen3-vl", "matryoshka.tokens.mode=mqt",
                                           f"matryoshka.tokens.mqt_queries={QUERIES}", "matryoshka.tokens.scales=[2,8]",
                                           "model.lora.enabled=true", "model.lora.strategy=per_scale",
                                           f"eval.shards={held_out}", "eval.generate_samples=3",
                                           "eval.max_new_tokens=3", "data.micro_batch_size=2"])  # fmt: skip
    (first, _) = prompt_batches(one_pass(held_out_loader(cfg, built, SINGLE, held_out)), 3, built)
    images = first.inputs["image_grid_thw"].shape[0]
    assert int((first.inputs["input_ids"] == built.image_token_id).sum()) == images * QUERIES
    metrics = evaluate_untouched(cfg, built, task)
    assert [metrics[f"eval/generated_answers/scale_{scale}"] for scale in (2, 8)] == [3.0, 3.0]


def test_init_from_an_mqt_export_keeps_its_scale_adapters_and_head(tmp_path):
    """`checkpoint.init_from` at the export of MQT after Qwen2-VL's projector with MSS LoRA (`init_from_adapters:
    train`): the run loads export/base (an `mtrain_mqt_qwen2_vl` folder: the stock model with the trained head) and
    every adapter into its own, and its task gives the source task's logits at every query count; so does
    mtrain.infer on the export, its scale adapters stacked on the remote-code base by stock PEFT."""
    from mtrain.checkpoint.export import write_model_folders
    from mtrain.checkpoint.init_from import init_from_start, load_kept_adapters
    from mtrain.model.build import build_model
    from mtrain.task.registry import build_task
    from tests.unit.test_model_checks import folder_config

    preset = "tiny-qwen2-vl"
    cfg = mqt_config(preset)
    task, built = lora_task(cfg)
    batch, _ = prompts_of(built, preset)
    rows = batch["input_ids"].shape[0]
    with torch.no_grad():
        want = {scale: task.eval().run(batch, [scale] * rows)[0] for scale in MQT_SCALES}
    rows_want = {scale: task_logits(task, batch, scale) for scale in MQT_SCALES}
    write_model_folders(built, cfg, tmp_path)  # merges (consumes) the built model's adapters: after the logits
    (tmp_path / "mtrain.json").write_text(json.dumps({"matryoshka": matryoshka_metadata(cfg)}))
    exported = MatryoshkaModel.from_export(tmp_path)
    for scale in MQT_SCALES:
        assert_logits_equal(exported, full_rows(batch, built), scale, rows_want[scale])
    start = init_from_start(tmp_path, "train")
    assert (start.model, start.adapters) == (tmp_path / "base", tmp_path / "adapter")
    again = folder_config(start.model, *mqt_overrides(cfg), "model.image_size=[32,32]")
    reloaded = build_model(again.model, torch.float32, None, seed=1, tokens=again.matryoshka.tokens)
    load_kept_adapters(reloaded.model, start.adapters, frozen=False)
    continued = build_task(again, reloaded, rank=0).eval()
    with torch.no_grad():
        for scale in MQT_SCALES:
            torch.testing.assert_close(continued.run(batch, [scale] * rows)[0], want[scale])


def mqt_overrides(cfg) -> list[str]:
    """The token and LoRA settings of `cfg` (`mqt_config`'s) as overrides for another model source."""
    tokens, lora = cfg.matryoshka.tokens, cfg.model.lora
    return ["matryoshka.tokens.mode=mqt", f"matryoshka.tokens.mqt_queries={tokens.mqt_queries}",
            f"matryoshka.tokens.scales=[{','.join(map(str, tokens.scales))}]", "matryoshka.tokens.layout=packed",
            "model.lora.enabled=true", f"model.lora.strategy={lora.strategy}", "model.lora.dropout=0.0",
            "model.freeze.always_train=[lm_head]"]  # fmt: skip
