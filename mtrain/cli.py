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
    validate.add_argument(
        "--deepspeed-json",
        type=int,
        metavar="WORLD_SIZE",
        help="print the DeepSpeed JSON this config gives at WORLD_SIZE ranks (launchers' dry runs)",
    )

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
    return parser


def print_deepspeed_json(cfg: TrainConfig, world_size: int) -> None:
    import json  # noqa: PLC0415

    from mtrain.config.deepspeed_json import deepspeed_config  # noqa: PLC0415
    from mtrain.engine.setup import resolve_placement  # noqa: PLC0415  (imports torch)

    if world_size < 1:
        raise ValueError(f"--deepspeed-json: the world size must be at least 1, got {world_size}")
    print(json.dumps(deepspeed_config(cfg, world_size, resolve_placement(cfg).precision), indent=2))


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
        if args.deepspeed_json is not None:
            print_deepspeed_json(cfg, args.deepspeed_json)
        print(f"ok: {args.config} is a valid mtrain config", file=sys.stderr)
        return 0
    if args.command == "train":
        cfg = load_config(args.config, args.overrides)  # fails here, before any process group forms
        from mtrain.engine.run import run_training  # noqa: PLC0415
        from mtrain.launch.preflight import PreflightError  # noqa: PLC0415

        try:
            run_training(cfg)
        except PreflightError as exc:
            print(f"mtrain: preflight error: {exc}", file=sys.stderr)
            return 3
        return 0
    if args.command == "export":
        from mtrain.checkpoint.export import export_checkpoint  # noqa: PLC0415

        out = export_checkpoint(args.checkpoint, args.out)
        print(f"exported to {out}")
        return 0
    if args.command == "data" and args.data_command == "sample":
        from data_pipeline.sample_data import write_sample_shards  # noqa: PLC0415

        paths = write_sample_shards(args.out, args.shards, args.per_shard, args.seed)
        print(f"wrote {len(paths)} shards x {args.per_shard} samples to {args.out}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")
