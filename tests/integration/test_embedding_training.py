"""Tiny MRL embedding training under 2-rank ZeRO-3 (torchrun, GradCache chunks), then retrieval eval.

The pairs are the coloured-shape images (query: image + "Represent the image") and their captions
(positive). Held-out pairs come from another seed; the untrained model is the baseline. The run evaluates
them in the loop (`eval.every`): recall@1/5 per dim at the right steps, equal to `mtrain eval` on the final
checkpoint.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.conftest import BIN, REPO, read_metrics, run, torchrun

pytestmark = pytest.mark.timeout(420)

DIMS = [8, 16, 32, 64]
STEPS, EVAL_EVERY = 30, 15


def recall_rows(stdout: str) -> dict[int, tuple[float, float]]:
    """dim -> (recall@1, recall@5) from the printed table."""
    rows = re.findall(r"^\s*2\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+\d+\s+\d+\s*$", stdout, flags=re.MULTILINE)
    return {int(dim): (float(r1), float(r5)) for dim, r1, r5 in rows}


def test_mrl_embedding_training_two_rank_zero3_then_retrieval_eval(tmp_path):
    from data_pipeline.pairs import write_pair_shards

    write_pair_shards(tmp_path / "pairs", num_shards=4, samples_per_shard=48, seed=0)
    # Two held-out shards: one per rank in the loop, read in shard order (the same gallery) by `mtrain eval`.
    write_pair_shards(tmp_path / "held_out", num_shards=2, samples_per_shard=32, seed=99)
    train_shards = str(tmp_path / "pairs" / "pairs-{000000..000003}.tar")
    held_out = str(tmp_path / "held_out" / "pairs-{000000..000001}.tar")
    run_dir = tmp_path / "run"
    config = str(REPO / "configs/tiny_embed.yaml")
    cmd = [
        *torchrun(), "-m", "mtrain",
        "train", config, f"run.dir={run_dir}", f"data.shards={train_shards}", f"run.max_steps={STEPS}",
        "logging.progress=false", "zero.param_persistence_threshold=0", "task.contrastive.chunk_size=4",
        f"eval.shards={held_out}", f"eval.every={EVAL_EVERY}",
    ]  # fmt: skip
    proc = run(cmd, cwd=tmp_path, timeout=360)
    assert proc.returncode == 0

    logged = read_metrics(run_dir)
    metrics = [m for m in logged if "loss" in m]
    evals = {m["step"]: m for m in logged if any(name.startswith("eval/") for name in m)}
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert sorted(evals) == [EVAL_EVERY, STEPS]
    for m in evals.values():
        assert sorted(m) == sorted(
            ["step", *(f"eval/{name}/dim_{d}" for name in ("recall_at_1", "recall_at_5", "queries") for d in DIMS)]
        )
        assert all(m[f"eval/queries/dim_{d}"] == 64 for d in DIMS)  # both ranks' shares, each pair once
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    for m in metrics:
        # Every dim contributes on both ranks every step, and the loss is their sum.
        assert [m[f"terms/layer2_dim{d}"] for d in DIMS] == [2.0] * len(DIMS)
        assert m["loss"] == pytest.approx(sum(m[f"loss/layer2_dim{d}"] for d in DIMS), rel=1e-4)
    reports = [json.loads((run_dir / "ranks" / f"rank{r:05d}.json").read_text()) for r in range(2)]
    assert all(
        abs(r["parameter_elements"]["constructed"]["local"] / r["parameter_elements"]["constructed"]["total"] - 0.5)
        < 0.05
        for r in reports
    )

    def evaluate(source: str, out: str) -> dict[int, tuple[float, float]]:
        cmd = [str(BIN / "python"), "-m", "mtrain", "eval", source, "--task", "retrieval", "--shards", held_out,
               "--out", str(tmp_path / out)]  # fmt: skip
        result = run(cmd, cwd=tmp_path, timeout=180)
        assert result.returncode == 0
        assert "recall@1" in result.stdout and (tmp_path / out / "retrieval.png").stat().st_size > 10_000
        return recall_rows(result.stdout)

    trained = evaluate(str(run_dir / "checkpoints"), "eval_trained")
    untrained = evaluate(config, "eval_untrained")
    assert sorted(trained) == DIMS and sorted(untrained) == DIMS
    saved = json.loads((tmp_path / "eval_trained" / "retrieval.json").read_text())["results"]
    assert [(r["layer"], r["dim"], r["queries"]) for r in saved] == [(2, d, 64) for d in DIMS]
    # The in-loop evaluation after the last step (2 ranks, ZeRO-3 shards, gathered gallery) against `mtrain eval`
    # on the checkpoint of that step (1 process, consolidated fp32 weights): the same queries, the same recall
    # but for an fp32 tie flipping one query's rank.
    for r in saved:
        in_loop = {name: evals[STEPS][f"eval/{name}/dim_{r['dim']}"] for name in ("recall_at_1", "recall_at_5")}
        assert evals[STEPS][f"eval/queries/dim_{r['dim']}"] == r["queries"]
        for name, value in in_loop.items():
            assert abs(value - r[name]) <= 1 / r["queries"], (r["dim"], name, value, r[name])
    gallery = saved[0]["gallery"]
    print(f"recall (r@1, r@5) by dim over {gallery} distinct positives: trained {trained}, untrained {untrained}")
    for dim in DIMS:
        # Far above chance (1/gallery, 5/gallery) and above the untrained model, at every size.
        assert trained[dim][0] > 4 / gallery, (dim, trained[dim], gallery)
        assert trained[dim][1] > untrained[dim][1] + 0.2, (dim, trained[dim], untrained[dim])

    # The embedding API on the trained checkpoint: unit vectors, nested by truncation.
    import random

    from data_pipeline.sample_data import draw_shape
    from mtrain.embed import Embedder

    embedder = Embedder.from_checkpoint(run_dir / "checkpoints")
    images = [draw_shape("red", "circle", random.Random(1)), draw_shape("blue", "square", random.Random(2))]
    full = embedder.embed(images, instruction="Represent the image")
    small = embedder.embed(images, dim=8, instruction="Represent the image")
    assert full.shape == (2, 64) and small.shape == (2, 8)
    torch.testing.assert_close(small.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(small, torch.nn.functional.normalize(full[:, :8], dim=1))
    captions = embedder.embed(["a red circle.", "a blue square."], dim=8)
    assert (small @ captions.T).argmax(dim=1).tolist() == [0, 1]
    assert embedder.metadata["dims"] == DIMS and embedder.metadata["layers"] == [2]

    # The export records dims and layers, and embeds as the checkpoint does.
    exported = Embedder.from_export(run_dir / "export")
    assert json.loads((run_dir / "export" / "embedding.json").read_text())["dims"] == DIMS
    assert exported.metadata["layers"] == [2] and exported.metadata["pooling"] == "last"
    torch.testing.assert_close(exported.embed(images, dim=8, instruction="Represent the image"), small)

    # The export names its Matryoshka sizes where vLLM looks (config.json) and in mtrain.json's spec.
    config = json.loads((run_dir / "export" / "model" / "config.json").read_text())
    assert config["matryoshka_dimensions"] == DIMS and config["is_matryoshka"] is True
    spec = json.loads((run_dir / "export" / "mtrain.json").read_text())["matryoshka"]
    assert (spec["objective"], spec["dims"], spec["dims_policy"], spec["layers"]) == ("contrastive", DIMS, "mrl", [])

    # mtrain.infer (stock transformers + PEFT) on the export embeds as the checkpoint does, at every dim.
    from data_pipeline.pairs import collate_side, encode_side
    from mtrain.infer import MatryoshkaModel

    stock = MatryoshkaModel.from_export(run_dir / "export")
    spec, pad, texts = embedder.spec, embedder.spec.tokenizer.pad_token_id, ["a red circle.", "a blue square."]
    for inputs, sides, instruction in (
        (images, [encode_side(spec, image, "", "Represent the image") for image in images], "Represent the image"),
        (texts, [encode_side(spec, None, text) for text in texts], ""),
    ):
        batch = collate_side(sides, pad, spec.image_size, embedder.image_processor)
        for dim in DIMS:
            want = embedder.embed(inputs, dim=dim, instruction=instruction)
            got = stock.embed(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], dim=dim, layer=2)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
