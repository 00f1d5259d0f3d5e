"""Run every benchmark once with reduced repetitions and write benchmarks/RESULTS.md.

    python benchmarks/run_all.py [--out benchmarks/RESULTS.md] [--only NAME ...]

About 15-25 minutes on 2 cores. Each benchmark runs as its own process (the distributed ones start
torchrun themselves); its printed summary, with every ratio and its min and max over repetitions,
goes into RESULTS.md beside the machine and library versions, followed by `mtrain plan`'s GPU
projection for LLaVA-1.5-7B at 8 and 64 H100s with every assumption it prints. Nothing here
asserts on speed: a slow or loaded machine changes the figures, never the exit status of CI.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import machine, ratio_line, versions  # noqa: E402

# name: (script, reduced arguments, what it compares)
BENCHMARKS = {
    "hf_trainer_step": ("hf_trainer_step.py", ["--rounds", "4", "--blocks", "5"],
                        "1. Step rate: mtrain vs HF Trainer + DeepSpeed ZeRO-3 (target >= 1.0x)"),
    "matryoshka_step": ("matryoshka_step.py", ["--rounds", "3", "--steps", "3"],
                        "2. Matryoshka step: one pass vs naive loop over scales, and vs the FLOP-ideal"),
    "data_throughput": ("data_throughput.py", ["--samples", "160", "--repeats", "3"],
                        "3. Loader vs plain webdataset and the decode limit"),
    "packing": ("packing.py", ["--repeats", "3"],
                "4. Packing: non-pad fraction, packed vs padded; native-resolution fill, header counts vs upper bound"),
    "checkpoint_io": ("checkpoint_io.py", ["--rounds", "5"],
                      "5. Checkpoint save/load vs fsync bandwidth (target: crash-safe save >= 0.8x)"),
    "scaling": ("scaling.py", ["--rounds", "2"], "6. Scaling: world size 1 vs 2 on the same global batch"),
    "startup": ("startup.py", ["--repeats", "4"],
                "7. Start-up: time to first batch at 100, 1,000 and 10,000 shards, local and HTTP (target <= 2x)"),
    "eval_memory": ("eval_memory.py", ["--rounds", "2"],
                    "8. Evaluation memory: peak RSS per rank with eval.every vs training alone (target <= 1.10x)"),
    "end_to_end": ("end_to_end.py", ["--rounds", "1", "--blocks", "3", "--block", "8"],
                   "9. End to end: learned tokens/s, mtrain packed vs HF Trainer padded as LLaVA trains, padded "
                   "with group_by_length, and padding-free (targets >= 1.5x, >= 1.0x and >= 1.1x)"),
    "zero_defaults": ("zero_defaults.py", ["--rounds", "2", "--blocks", "3", "--steps", "3"],
                      "10. ZeRO-3 sizes: the model-sized default vs DeepSpeed's default and threshold 0 at two widths "
                      "(target >= 1.0x), and its memory at 7B"),
}  # fmt: skip

PLAN_OVERRIDES = [
    "model.preset=none", "model.lora.enabled=false", "model.freeze.language_model=false",
    "model.freeze.always_train=[]", "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,9,36,144,576]",
    "data.max_len=2048", "data.micro_batch_size=4",
]  # fmt: skip
# Benchmarks that measure once per process: run this many times, ratios summarised over the runs.
REPEATS: dict[str, int] = {}
RATIO = re.compile(r"(\d+\.\d+)x")
NOISE = re.compile(r"^\[|^\s*warnings\.warn|Warning|DeepSpeed deepspeed\.ops|^\{'train_runtime'")


def run(cmd: list[str], log: Path) -> tuple[str, float, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    with open(log, "w") as errors:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    lines = [line for line in done.stdout.splitlines() if not NOISE.search(line)]
    return "\n".join(lines).strip(), time.perf_counter() - started, done.returncode


def spread_over_runs(outputs: list[str]) -> str:
    """Every ratio line of repeated runs as median (min, max) over the runs."""
    values: dict[str, list[float]] = {}
    for output in outputs:
        for line in output.splitlines():
            found = RATIO.findall(line)
            if found:
                label = re.split(r"\s+\d", line.strip(), maxsplit=1)[0].rstrip(":")
                values.setdefault(label, []).append(float(found[0]))
    return "\n".join(ratio_line(label, v, note=f"({len(v)} runs)") for label, v in values.items())


def llava7b_config(folder: Path) -> Path:
    """LLaVA-1.5-7B's config.json (CLIP ViT-L/14-336 + Vicuna-7B shapes), no weights: all the plan reads."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)  # fmt: skip
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=32000, vision_feature_layer=-2)
    config.save_pretrained(folder)
    return folder


def merged(old: str, sections: list[str], summary: list[str], names: list[str]) -> str:
    """The existing RESULTS.md with the rows and sections of the re-run benchmarks replaced."""
    # A section is known by its number ("9. "), so a re-worded title replaces the old section, not joins it.
    titles = [BENCHMARKS[name][2].split()[0] + " " if name in BENCHMARKS else "GPU projection" for name in names]
    head, _, details = old.partition("## Details\n")
    rerun = f"Re-run on their own later (`--only {' '.join(names)} --merge`): {', '.join(names)}.\n\n## Every ratio"
    head = head.replace("## Every ratio", rerun, 1)
    rows = [line for line in head.splitlines() if not any(line.startswith(f"| {name} ") for name in names)]
    at = max(i for i, line in enumerate(rows) if line.startswith("|")) + 1
    rows[at:at] = summary
    kept = [part for part in details.split("### ")[1:] if not any(part.startswith(title) for title in titles)]
    parts = [f"### {part}" for part in kept]
    for section in sections:
        index = next((i for i, t in enumerate(BENCHMARKS.values()) if section.startswith(f"### {t[2]}")), 99)
        parts.insert(min(index, len(parts)), section)
    return "\n".join(rows) + "\n## Details\n\n" + "\n".join(part.rstrip() + "\n" for part in parts).rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"))
    parser.add_argument("--only", nargs="*", choices=[*BENCHMARKS, "plan"], help="run a subset")
    parser.add_argument("--merge", action="store_true", help="with --only: replace those benchmarks in --out")
    args = parser.parse_args()
    chosen = args.only or [*BENCHMARKS, "plan"]
    scratch = Path(tempfile.mkdtemp(prefix="mtrain-run-all-"))
    started_all = time.perf_counter()
    header = machine()
    sections, summary = [], []
    for name in chosen:
        if name == "plan":
            continue
        script, extra, title = BENCHMARKS[name]
        print(f"== {title}", flush=True)
        runs = [run([sys.executable, str(BENCH / script), *extra], scratch / f"{name}.log")
                for _ in range(REPEATS.get(name, 1))]  # fmt: skip
        output, seconds, code = runs[-1][0], sum(r[1] for r in runs), max(r[2] for r in runs)
        if len(runs) > 1:
            output = f"{output}\n\nover {len(runs)} runs:\n{spread_over_runs([r[0] for r in runs])}"
        print(output, flush=True)
        status = "" if code == 0 else f" -- FAILED (exit {code}; stderr tail below)"
        if code:
            output += "\n" + "\n".join((scratch / f"{name}.log").read_text().splitlines()[-15:])
        command = " ".join(["python", f"benchmarks/{script}", *extra])
        sections.append(f"### {title}\n\n`{command}` ({seconds:.0f} s){status}\n\n```\n{output}\n```\n")
        ratio_lines = [line.strip() for line in output.splitlines() if RATIO.search(line)]
        if len(runs) > 1:  # the summary keeps only the ratios with their spread over runs
            ratio_lines = [line for line in ratio_lines if line.endswith("runs)")]
        summary += [f"| {name} | {line.replace('|', '/')} |" for line in ratio_lines]
    if "plan" in chosen:
        folder = llava7b_config(scratch / "llava-1.5-7b")
        for gpus, (nodes, per_node) in ((8, (1, 8)), (64, (8, 8))):
            cmd = [sys.executable, "-m", "mtrain", "plan", "configs/tiny.yaml", *PLAN_OVERRIDES,
                   f"model.path={folder}", "--nodes", str(nodes), "--gpus-per-node", str(per_node),
                   "--text-tokens", "300"]  # fmt: skip
            print(f"== GPU projection, {gpus} GPUs", flush=True)
            output, seconds, code = run(cmd, scratch / f"plan{gpus}.log")
            print(output, flush=True)
            shown = " ".join(["mtrain plan configs/tiny.yaml", *PLAN_OVERRIDES, "model.path=<llava-1.5-7b config>",
                              f"--nodes {nodes} --gpus-per-node {per_node} --text-tokens 300"])  # fmt: skip
            status = "" if code == 0 else f" -- FAILED (exit {code})"
            headline = re.compile(r"projected MFU|projected tokens/s|% MFU$|torchtitan dense|this plan:")
            summary += [
                f"| plan {gpus} GPUs | {line.strip()} |" for line in output.splitlines() if headline.search(line)
            ]
            sections.append(
                f"### GPU projection: LLaVA-1.5-7B, {gpus} x H100{status}\n\n`{shown}`\n\n```\n{output}\n```\n"
            )
    total = time.perf_counter() - started_all
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            "# mtrain benchmark results",
            "",
            f"Written by `python benchmarks/run_all.py` on {now} in {total / 60:.1f} min. Every figure is measured",
            "side by side in one run on this machine; ratios carry their median, min and max over repetitions",
            "(alternating runs). These are benchmarks, not tests: nothing asserts on speed.",
            "",
            "## Machine and versions",
            "",
            *header,
            f"- versions: {versions()}",
            "",
            "## Every ratio",
            "",
            "| benchmark | line |",
            "|---|---|",
            *summary,
            "",
            "## Details",
            "",
            *sections,
        ]
    )
    if args.merge and Path(args.out).exists():
        text = merged(Path(args.out).read_text(), sections, summary, chosen)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out} ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
