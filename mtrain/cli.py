"""The `mtrain` command: parse argv, validate, call the library. No training logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from mtrain.config import ConfigError, dump_yaml, field_docs, load_config
from mtrain.config.schema import TrainConfig


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="a.b.c=value", help="dotted overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtrain", description=__doc__)
    # The deepspeed launcher passes --local_rank; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train under whichever launcher started this process")
    _add_config_args(train)

    validate = commands.add_parser("validate", help="check a config and overrides; spawns nothing")
    _add_config_args(validate)
    validate.add_argument("--print", action="store_true", help="print the resolved config")
    validate.add_argument(
        "--config-only",
        action="store_true",
        help="check only the config, not that its shards, model folder and run folder fit (see run.remote_paths)",
    )
    validate.add_argument("--explain", action="store_true", help="print every key with its description")
    validate.add_argument(
        "--deepspeed-json",
        type=int,
        metavar="WORLD_SIZE",
        help="print the DeepSpeed JSON this config gives at WORLD_SIZE ranks (launchers' dry runs)",
    )

    evaluate = commands.add_parser(
        "eval", help="budget: loss and accuracy at every visual-token scale; retrieval: recall at every dim; PNG curve"
    )
    evaluate.add_argument("source", help="a checkpoint (folder) or a config (YAML)")
    evaluate.add_argument("--task", choices=("budget", "retrieval"), default="budget", help="what to evaluate")
    evaluate.add_argument("overrides", nargs="*", metavar="a.b.c=value", help="dotted overrides")
    evaluate.add_argument("--shards", help="evaluation shards (default: the config's data.shards)")
    evaluate.add_argument("--batches", type=int, default=0, help="batches to evaluate (0: the whole held-out set)")
    evaluate.add_argument("--scales", help="comma-separated budgets (default: the scales the model trained at)")
    evaluate.add_argument(
        "--untrained-budgets",
        action="store_true",
        help="allow --scales the model never trained at (marked in the output)",
    )
    evaluate.add_argument("--dims", help="retrieval: comma-separated embedding sizes (default: the trained dims)")
    evaluate.add_argument("--out", default="eval", help="folder for the JSON report and PNG curve")
    evaluate.add_argument(
        "--generate-samples",
        type=int,
        help="budget: answer the first N held-out samples by greedy generation at every scale (default: the "
        "config's eval.generate_samples; 0: none)",
    )
    evaluate.add_argument("--max-new-tokens", type=int, help="the longest generated answer (eval.max_new_tokens)")

    generate = commands.add_parser("generate", help="a quick look: the greedy answer about one picture at a scale")
    generate.add_argument("source", help="an export folder (holding mtrain.json), or a checkpoint or run folder")
    generate.add_argument("--image", required=True, help="a picture file")
    generate.add_argument("--prompt", required=True, help="the question about it")
    generate.add_argument("--scale", type=int, help="visual tokens per image, a trained scale (default: the largest)")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="the longest answer, in tokens")

    plan = commands.add_parser("plan", help="per-GPU memory, tokens per step and an H100 projection; no weights read")
    _add_config_args(plan)
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    plan.add_argument("--gpu-mem", default="80GB", help="memory per GPU, e.g. 80GB, 40GB (default 80GB)")
    plan.add_argument("--text-tokens", type=int, help="mean text tokens per sample (default: fill data.max_len)")

    plot = commands.add_parser(
        "plot", help="PNG curves (loss per scale and dim, throughput, quality against budget) from a run folder"
    )
    plot.add_argument("run_dir", help="a run folder holding metrics.jsonl")
    plot.add_argument("--out", help="output folder (default: RUN_DIR/plots)")
    plot.add_argument(
        "--budget",
        action="store_true",
        help="only budget.png (quality against budget over training); fails without eval",
    )

    export = commands.add_parser("export", help="export a checkpoint to Hugging Face folders")
    export.add_argument("checkpoint", help="checkpoint folder (step_XXXXXXXX) or the root holding 'latest'")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument(
        "--adapter-only",
        action="store_true",
        help="write only the PEFT adapter the checkpoint holds (gathered from trainable parameters at save)",
    )

    inspect = commands.add_parser("inspect", help="summarise a checkpoint or a checkpoints folder (reads no pickle)")
    inspect.add_argument("checkpoint", help="checkpoint folder (step_XXXXXXXX) or a checkpoints folder")
    inspect.add_argument("--checksums", action="store_true", help="verify every file's checksum against the manifest")
    inspect.add_argument(
        "--config",
        nargs="+",
        metavar="CONFIG [a.b.c=value]",
        help="a config (and overrides) to compare with the checkpoint's",
    )

    data = commands.add_parser("data", help="shard tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    sample = data_commands.add_parser("sample", help="write the learnable sample shards")
    sample.add_argument("--out", default="data/sample", help="output folder (default: data/sample)")
    sample.add_argument("--shards", type=int, default=4, help="number of shards")
    sample.add_argument("--per-shard", type=int, default=96, help="samples per shard")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--kind",
        choices=("captions", "interleaved", "conversation", "pairs"),
        default="captions",
        help="caption pairs, interleaved documents, LLaVA conversations, or (query, positive) pairs",
    )

    build = data_commands.add_parser("build", help="convert local data to shards (see data_pipeline/FORMAT.md)")
    build.add_argument("form", choices=["interleaved", "mmc4", "conversation", "caption", "pair"])
    build.add_argument(
        "source",
        help="interleaved: OBELICS-style JSONL / JSON list / parquet; mmc4: MMC4 JSONL; conversation: LLaVA, "
        "ShareGPT or OpenAI-messages JSON list / JSONL; caption: a folder or CSV; pair: JSONL",
    )
    build.add_argument("--out", required=True, help="output folder for the shards and index.json")
    build.add_argument("--images", help="folder the image paths are relative to (default: the input's folder)")
    build.add_argument(
        "--max-skipped",
        type=float,
        default=0.05,
        help="fail when more than this fraction of input records is bad (default 0.05)",
    )
    build.add_argument("--shard-size", default="256MB", help="target shard size, e.g. 256MB (default)")
    build.add_argument("--max-image-side", type=int, default=0, help="re-encode images with a longer side")

    index = data_commands.add_parser("index", help="write index.json (samples and bytes per shard) beside local shards")
    index.add_argument("folder", help="a folder of .tar / .tar.gz / .tgz shards")
    index.add_argument("--form", default="unknown", help="the form to record (interleaved, caption, ...)")

    for name, text in (
        ("inspect", "counts, images per sample, token lengths (a config's tokenizer and visual tokens), one sample"),
        ("validate", "report every bad member by shard, key and reason; exit 1 if any"),
    ):
        checker = data_commands.add_parser(name, help=text)
        checker.add_argument(
            "shards", nargs="+", help="shards: paths, globs, brace patterns, URLs (several allowed; quote braces)"
        )
        checker.add_argument(
            "--max-image-pixels", type=int, default=4096 * 4096, help="ignored with --config (data.max_image_pixels)"
        )
        checker.add_argument(
            "--config",
            nargs="+",
            metavar="CONFIG [a.b=c ...]",
            help="tokenize as this training config does (tokenizer, visual tokens, data.max_len, data.prompt, "
            "data.require_image, data.max_image_pixels); validate then also reports the samples training would "
            "drop (nothing_learned, no_image)",
        )
        checker.add_argument(
            "--require-image", action="store_true", help="count conversations and documents without images as bad"
        )
    return parser


def print_deepspeed_json(cfg: TrainConfig, world_size: int) -> None:
    import json  # noqa: PLC0415

    from mtrain.config.deepspeed_json import deepspeed_config  # noqa: PLC0415
    from mtrain.engine.setup import resolve_placement  # noqa: PLC0415  (imports torch)

    if world_size < 1:
        raise ValueError(f"--deepspeed-json: the world size must be at least 1, got {world_size}")
    print(json.dumps(deepspeed_config(cfg, world_size, resolve_placement(cfg).precision), indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. mtrain's own errors print one line (MTRAIN_DEBUG=1: with the traceback) and exit
    with EXIT_NO_RETRY (2), which the restart loops in launchers/ never retry (see launch/outcome.py)."""
    from mtrain.launch.outcome import NoRetryError, report_final_error  # noqa: PLC0415

    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        return _leave(report_final_error("config error", exc))
    except (FileNotFoundError, ValueError, NoRetryError) as exc:
        return _leave(report_final_error("error", exc))
    except Exception as exc:
        # Bad data can only stop a job that imported the loader; importing it here would slow `validate`.
        loader = sys.modules.get("data_pipeline.loader")
        if loader is not None and isinstance(exc, loader.DataQualityError):
            return _leave(report_final_error("data error", exc))
        raise


def _generation_overrides(args: argparse.Namespace) -> list[str]:
    """`mtrain eval --generate-samples/--max-new-tokens` as the `eval.` keys they set."""
    flags = {"eval.generate_samples": args.generate_samples, "eval.max_new_tokens": args.max_new_tokens}
    return [f"{key}={value}" for key, value in flags.items() if value is not None]


def _leave(code: int) -> int:
    """Exit status `code`; a rank of a multi-rank job leaves without C++ finalisation (see leave_finished_job),
    which could otherwise hang or abort on the communication threads of a job that stopped mid-step."""
    distributed = sys.modules.get("mtrain.launch.distributed")
    return distributed.leave_finished_job(code) if distributed is not None else code


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "validate":
        cfg = load_config(args.config, args.overrides)
        if not args.config_only:
            from mtrain.checkpoint.run_folder import check_fresh_start  # noqa: PLC0415
            from mtrain.launch.inputs import check_inputs  # noqa: PLC0415

            check_inputs(cfg, on_submit_host=True)
            if "model.path" not in cfg.run.remote_paths:
                from mtrain.launch.model_checks import check_model  # noqa: PLC0415

                check_model(cfg)
            check_fresh_start(Path(cfg.run.dir), cfg.checkpoint.resume, cfg.checkpoint.start_over)
        if args.explain:
            for key, doc in field_docs(TrainConfig).items():
                print(f"{key:45s} {doc}")
        if args.print:
            print(dump_yaml(cfg), end="")
        if args.deepspeed_json is not None:
            print_deepspeed_json(cfg, args.deepspeed_json)
        checked = "config" if args.config_only else "config; its inputs exist"
        print(f"ok: {args.config} is a valid mtrain {checked}", file=sys.stderr)
        return 0
    if args.command == "train":
        cfg = load_config(args.config, args.overrides)  # fails here, before any process group forms
        if cfg.logging.wandb:
            from mtrain.metrics.sinks import require_wandb  # noqa: PLC0415

            require_wandb()
        from mtrain.engine.run import run_training  # noqa: PLC0415
        from mtrain.launch.distributed import leave_finished_job  # noqa: PLC0415
        from mtrain.launch.outcome import (  # noqa: PLC0415
            is_lost_peer,
            raise_keyboard_interrupt_on_sigterm,
            report_interrupt,
            report_lost_peer,
        )
        from mtrain.launch.preflight import PreflightError  # noqa: PLC0415

        raise_keyboard_interrupt_on_sigterm()
        try:
            run_training(cfg)
        except PreflightError as exc:
            print(f"mtrain: preflight error: {exc}", file=sys.stderr)
            return 3
        except KeyboardInterrupt:
            return leave_finished_job(report_interrupt(Path(cfg.run.dir)))
        except RuntimeError as exc:
            if not is_lost_peer(exc):
                raise
            return leave_finished_job(report_lost_peer(exc))
        return leave_finished_job(0)
    if args.command == "eval" and args.task == "retrieval":
        from mtrain.eval.retrieval import run_retrieval_eval  # noqa: PLC0415

        dims = [int(d) for d in args.dims.split(",")] if args.dims else None
        run_retrieval_eval(args.source, args.overrides, args.shards, args.batches, dims, args.out)
        return _leave(0)
    if args.command == "eval":
        from mtrain.eval.run import run_eval  # noqa: PLC0415

        scales = [int(s) for s in args.scales.split(",")] if args.scales else None
        overrides = [*args.overrides, *_generation_overrides(args)]  # checked with the config they change
        run_eval(args.source, overrides, args.shards, args.batches, scales, args.out, args.untrained_budgets)
        return _leave(0)  # a rank of a multi-rank eval leaves as a finished training rank does
    if args.command == "generate":
        from mtrain.eval.generation import run_generate  # noqa: PLC0415

        print(run_generate(args.source, args.image, args.prompt, args.scale, args.max_new_tokens))
        return 0
    if args.command == "plan":
        from mtrain.metrics.plan import Cluster, format_plan, make_plan, parse_memory  # noqa: PLC0415

        cfg = load_config(args.config, args.overrides)
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ValueError(f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node}: both must be at least 1")
        cluster = Cluster(args.nodes, args.gpus_per_node, parse_memory(args.gpu_mem))
        print(format_plan(make_plan(cfg, cluster, args.text_tokens)))
        return 0
    if args.command == "plot":
        from mtrain.metrics.plot import BUDGET_PLOT, plot_budget_over_training, plot_run  # noqa: PLC0415

        written = (
            [plot_budget_over_training(args.run_dir, args.out)] if args.budget else plot_run(args.run_dir, args.out)
        )
        for path in written:
            print(f"wrote {path}")
        if all(path.name != BUDGET_PLOT for path in written):
            print(f"no {BUDGET_PLOT}: the run logged no evaluation (train with eval.shards set to draw it)")
        return 0
    if args.command == "export":
        from mtrain.checkpoint.export import export_checkpoint  # noqa: PLC0415

        out = export_checkpoint(args.checkpoint, args.out, adapter_only=args.adapter_only)
        print(f"exported to {out}")
        return 0
    if args.command == "inspect":
        from mtrain.checkpoint.inspect import inspect_path  # noqa: PLC0415

        config, overrides = (args.config[0], args.config[1:]) if args.config else (None, [])
        print(inspect_path(args.checkpoint, checksums=args.checksums, config=config, overrides=overrides))
        return 0
    if args.command == "data" and args.data_command == "sample":
        from data_pipeline import sample_data  # noqa: PLC0415
        from data_pipeline.pairs import write_pair_shards  # noqa: PLC0415

        writer = {
            "captions": sample_data.write_sample_shards,
            "interleaved": sample_data.write_interleaved_shards,
            "conversation": sample_data.write_conversation_shards,
            "pairs": write_pair_shards,
        }[args.kind]
        paths = writer(args.out, args.shards, args.per_shard, args.seed)
        print(f"wrote {len(paths)} shards x {args.per_shard} samples to {args.out}")
        return 0
    if args.command == "data":
        return _data_command(args)
    raise AssertionError(f"unhandled command {args.command}")


class DataTokens(NamedTuple):
    """How a training config tokenizes data, for `mtrain data inspect/validate --config`."""

    tokenizer: Any
    image_token_id: int
    visual_tokens: int  # tokens each <image> stands for
    max_len: int | None  # data.max_len; None without a config
    data: Any  # the config's DataConfig; None without a config
    image_markers: tuple[str, str] = ("", "")  # the model family's text around every image (ModelFamily)
    # Each image's own count from its (height, width) at Qwen's native resolution; None: `visual_tokens` each.
    image_tokens: Any = None


def _data_tokens(config: list[str] | None) -> DataTokens:
    """The tokenizer, image token, visual tokens per image and data section of a training config,
    without weights; the tiny-llava preset's without one."""
    from mtrain.config.schema import TinyLlavaConfig  # noqa: PLC0415
    from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer  # noqa: PLC0415

    if not config:
        tokenizer = build_tiny_tokenizer()
        return DataTokens(
            tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), TinyLlavaConfig().visual_tokens, None, None
        )
    from mtrain.model.build import load_model_config  # noqa: PLC0415
    from mtrain.model.families import family_for  # noqa: PLC0415

    cfg = load_config(config[0], config[1:])
    tokens = cfg.matryoshka.tokens
    if cfg.model.path:
        from transformers import AutoTokenizer  # noqa: PLC0415

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, local_files_only=True, trust_remote_code=False)
        model_config = load_model_config(cfg.model.path)
        from mtrain.model.build import folder_image_tokens  # noqa: PLC0415

        family = family_for(model_config.model_type, f"model.path={cfg.model.path!r}")
        # Qwen: every image's merged grid, or (native resolution) the most an image has
        visual, _ = folder_image_tokens(model_config, cfg.model.image_size, cfg.model.image_pixels, cfg.model.path)
        image_token_id = family.image_token_id(model_config)
        markers = family.image_markers
    else:
        from mtrain.model.build import preset_config  # noqa: PLC0415

        tokenizer, model_config = preset_config(cfg.model)
        family = family_for(model_config.model_type)
        visual, image_token_id = cfg.model.tiny_visual_tokens, family.image_token_id(model_config)
        markers = family.image_markers
    if cfg.model.chat_template:
        tokenizer.chat_template = cfg.model.chat_template
    if tokens.mode == "mqt":
        visual = tokens.mqt_queries
    image_tokens = native_size_tokens(model_config, cfg.model.image_pixels, tokens) if cfg.model.image_pixels else None
    return DataTokens(tokenizer, image_token_id, visual, cfg.data.max_len, cfg.data, markers, image_tokens)


def native_size_tokens(model_config: Any, image_pixels: list[int], tokens: Any) -> Any:
    """Training's count of an image from its (height, width) at Qwen's native resolution (the loader's
    `image_tokens`), from the model config's patch and merge sizes: no weights, no processor files."""
    from transformers import Qwen2VLImageProcessorPil  # noqa: PLC0415

    from mtrain.model.build import native_processor  # noqa: PLC0415

    vision = model_config.vision_config
    stock = Qwen2VLImageProcessorPil(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size)
    return native_processor(stock, image_pixels, tokens)[0].size_tokens


def _data_rules(args: argparse.Namespace, tokens: DataTokens | None) -> Any:
    """SampleRules of `data inspect/validate`: training's, from the config's data section and chat template,
    where one is given (`--require-image` can add the image requirement to them)."""
    import dataclasses  # noqa: PLC0415

    from data_pipeline.formats import SampleRules  # noqa: PLC0415
    from mtrain.engine.data import sample_rules  # noqa: PLC0415

    if tokens is None or tokens.data is None:
        return SampleRules(require_image=args.require_image, max_image_pixels=args.max_image_pixels)
    rules = sample_rules(tokens.data, tokens.tokenizer)
    return dataclasses.replace(rules, require_image=True) if args.require_image else rules


def _data_command(args: argparse.Namespace) -> int:
    from data_pipeline.shards import expand_shards  # noqa: PLC0415

    if args.data_command == "build":
        from data_pipeline.build import BuildError, BuildReport, build_shards, parse_size  # noqa: PLC0415

        size = parse_size(args.shard_size)
        report = BuildReport()
        try:
            build_shards(
                args.form, args.source, args.out, size, args.images, args.max_image_side, args.max_skipped, report
            )
        except BuildError as exc:
            print(exc, file=sys.stderr)
            return 1
        finally:
            for line in report.skipped:
                print(f"skipped {line}", file=sys.stderr)
        print(f"wrote {report.samples} samples in {len(report.shards)} shards to {args.out}: {report.summary()}")
        return 0
    if args.data_command == "index":
        from pathlib import Path  # noqa: PLC0415

        from data_pipeline.shards import write_index  # noqa: PLC0415

        folder = Path(args.folder)
        urls = sorted(str(p) for suffix in ("*.tar", "*.tar.gz", "*.tgz") for p in folder.glob(suffix))
        if not urls:
            print(f"data index: no .tar, .tar.gz or .tgz shards in {folder}", file=sys.stderr)
            return 1
        written = write_index(folder, args.form, urls)
        print(f"wrote {folder / 'index.json'}: {len(urls)} shards, {sum(written['samples'].values())} samples")
        return 0
    urls = [url for pattern in args.shards for url in expand_shards(pattern)]
    # validate needs a tokenizer only to check samples as a config tokenizes them
    tokens = _data_tokens(args.config) if args.config or args.data_command == "inspect" else None
    rules = _data_rules(args, tokens)
    if args.data_command == "inspect":
        from data_pipeline.check import inspect_report  # noqa: PLC0415

        count = lambda text: len(tokens.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        print(inspect_report(urls, rules, count, tokens.visual_tokens, tokens.max_len))
        return 0
    if args.data_command == "validate":
        from data_pipeline.check import iter_problems  # noqa: PLC0415
        from data_pipeline.loader import DocumentForm  # noqa: PLC0415
        from data_pipeline.tokenize import TokenSpec  # noqa: PLC0415

        tokenize = None
        if tokens is not None:  # samples training would drop when tokenizing them (nothing learned, no image left)
            spec = TokenSpec.with_markers(tokens.tokenizer, tokens.image_token_id, tokens.max_len, tokens.image_markers)
            tokenize = DocumentForm(rules, spec, tokens.visual_tokens, False, tokens.image_tokens).tokens
        problems = 0
        for problem in iter_problems(urls, rules, tokenize=tokenize):  # printed as found: nothing kept
            print(problem, flush=True)
            problems += 1
        print(f"{len(urls)} shard(s): {problems} bad member(s) or sample(s)", file=sys.stderr)
        return 1 if problems else 0
    raise AssertionError(f"unhandled data command {args.data_command}")
