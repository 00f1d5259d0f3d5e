"""The `mtrain` command: parse argv, validate, call the library. No training logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
    validate.add_argument("--explain", action="store_true", help="print every key with its description")

    evaluate = commands.add_parser(
        "eval", help="budget: loss and accuracy at every visual-token scale; retrieval: recall at every dim; PNG curve"
    )
    evaluate.add_argument("source", help="a checkpoint (folder) or a config (YAML)")
    evaluate.add_argument("--task", choices=("budget", "retrieval"), default="budget", help="what to evaluate")
    evaluate.add_argument("overrides", nargs="*", metavar="a.b.c=value", help="dotted overrides")
    evaluate.add_argument("--shards", help="evaluation shards (default: the config's data.shards)")
    evaluate.add_argument("--batches", type=int, default=4, help="batches to evaluate")
    evaluate.add_argument("--scales", help="comma-separated budgets (default: the trained scales, else every M3 scale)")
    evaluate.add_argument("--dims", help="retrieval: comma-separated embedding sizes (default: the trained dims)")
    evaluate.add_argument("--out", default="eval", help="folder for the JSON report and PNG curve")

    export = commands.add_parser("export", help="export a checkpoint to Hugging Face folders")
    export.add_argument("checkpoint", help="checkpoint folder (step_XXXXXXXX) or the root holding 'latest'")
    export.add_argument("--out", required=True, help="output folder")

    data = commands.add_parser("data", help="shard tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    sample = data_commands.add_parser("sample", help="write the learnable sample shards")
    sample.add_argument("--out", default="data/sample", help="output folder (default: data/sample)")
    sample.add_argument("--shards", type=int, default=4, help="number of shards")
    sample.add_argument("--per-shard", type=int, default=96, help="samples per shard")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--kind", choices=("captions", "pairs"), default="captions", help="caption pairs, or (query, positive) pairs"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"mtrain: config error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"mtrain: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "validate":
        cfg = load_config(args.config, args.overrides)
        if args.explain:
            for key, doc in field_docs(TrainConfig).items():
                print(f"{key:45s} {doc}")
        if args.print:
            print(dump_yaml(cfg), end="")
        print(f"ok: {args.config} is a valid mtrain config", file=sys.stderr)
        return 0
    if args.command == "train":
        cfg = load_config(args.config, args.overrides)  # fails here, before any process group forms
        from mtrain.engine.run import run_training  # noqa: PLC0415

        run_training(cfg)
        return 0
    if args.command == "eval" and args.task == "retrieval":
        from mtrain.eval.retrieval import run_retrieval_eval  # noqa: PLC0415

        dims = [int(d) for d in args.dims.split(",")] if args.dims else None
        run_retrieval_eval(args.source, args.overrides, args.shards, args.batches, dims, args.out)
        return 0
    if args.command == "eval":
        from mtrain.eval.run import run_eval  # noqa: PLC0415

        scales = [int(s) for s in args.scales.split(",")] if args.scales else None
        run_eval(args.source, args.overrides, args.shards, args.batches, scales, args.out)
        return 0
    if args.command == "export":
        from mtrain.checkpoint.export import export_checkpoint  # noqa: PLC0415

        out = export_checkpoint(args.checkpoint, args.out)
        print(f"exported to {out}")
        return 0
    if args.command == "data" and args.data_command == "sample":
        from data_pipeline.pairs import write_pair_shards  # noqa: PLC0415
        from data_pipeline.sample_data import write_sample_shards  # noqa: PLC0415

        writer = write_pair_shards if args.kind == "pairs" else write_sample_shards
        paths = writer(args.out, args.shards, args.per_shard, args.seed)
        print(f"wrote {len(paths)} shards x {args.per_shard} samples to {args.out}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")
