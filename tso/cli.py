"""The `tso` command. Each area registers its own subcommands; this file holds no logic."""

from __future__ import annotations

import argparse
import importlib
import sys

from tso.config import ConfigError

# Modules that define `register(subparsers)`; each subcommand sets `func(args) -> int`.
COMMAND_MODULES = [
    "tso.commands",
    "tso.zoo.commands",
    "tso.serving.commands",
    "tso.pairs.commands",
    "tso.train.commands",
    "tso.run.commands",
    "tso.models.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tso",
        description="TSO: self-training with scaled preference optimization on a Ray cluster.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
