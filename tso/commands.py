"""General subcommands: `tso config check|show`."""

from __future__ import annotations

import argparse

from tso.config import dump_config, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="validate or print a run config")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = csub.add_parser("check", help="validate a run config (names file and field on error)")
    check.add_argument("config")
    check.set_defaults(func=_check)
    show = csub.add_parser("show", help="print a run config with every default filled in")
    show.add_argument("config")
    show.set_defaults(func=_show)


def _check(args) -> int:
    cfg = load_config(args.config)
    from tso.method.sources import resolve_sources

    mix = resolve_sources(cfg.matrix, cfg.pairs.human_weight)
    print(f"{args.config}: ok ({len(cfg.matrix.models)} models, base {cfg.matrix.base}, {cfg.stages} stages)")
    print(f"  positives (alpha): {mix.alpha}")
    print(f"  negatives (gamma): {mix.gamma}")
    return 0


def _show(args) -> int:
    print(dump_config(load_config(args.config)), end="")
    return 0
