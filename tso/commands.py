"""General subcommands: `tso config check|show|reference`."""

from __future__ import annotations

import argparse

from tso.config import dump_config, load_config, resolve_config_ref


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable) on every command that takes a run config."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set stages=1 --set pairs.max_prompts=8 (YAML values)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="validate or print a run config")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = csub.add_parser("check", help="validate a run config (names file and field on error)")
    check.add_argument("config", help="a YAML file, or builtin:NAME (demo, dpo, ipo, cdpo, self_reward)")
    check.set_defaults(func=_check)
    show = csub.add_parser("show", help="print a run config with every default filled in")
    show.add_argument("config")
    show.set_defaults(func=_show)
    ref = csub.add_parser("reference", help="print the configuration reference (Markdown)")
    ref.set_defaults(func=_reference)


def _check(args) -> int:
    cfg = load_config(resolve_config_ref(args.config))
    mix = cfg.mixtures()
    print(f"{args.config}: ok ({len(cfg.matrix.models)} models, base {cfg.matrix.base}, {cfg.stages} stages)")
    if cfg.pairs.mode in ("self_reward", "rso"):
        print(f"  pairs.mode {cfg.pairs.mode}: the policy's own judged samples only (no matrix answers)")
    else:
        print(f"  positives (alpha): {mix.alpha}")
        print(f"  negatives (gamma): {mix.gamma}")
    return 0


def _show(args) -> int:
    print(dump_config(load_config(resolve_config_ref(args.config))), end="")
    return 0


def config_reference() -> str:
    """A Markdown table of every config field, its default and its meaning, generated from the models."""
    from pydantic import BaseModel

    from tso.config import RunConfig

    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str, defaults: BaseModel | None = None) -> None:
        """``defaults``: the instance a parent field's default factory builds (the judge's sampling is
        greedy, not SamplingConfig's own 0.7), so the table shows the defaults a config really gets."""
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            ann = field.annotation
            sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            nested = None
            if sub is not None and not field.is_required():
                nested = getattr(defaults, name) if defaults is not None else field.get_default(call_default_factory=True)
            if sub is None:  # list[ModelEntry] (path[]) and optional sections (Settings | None)
                args = getattr(ann, "__args__", ())
                sub = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
                if sub is not None and getattr(ann, "__origin__", None) is list:
                    path += "[]"
            if sub is not None:
                walk(sub, path + ".", nested if isinstance(nested, BaseModel) else None)
                continue
            if field.is_required():
                default = "required"
            else:
                value = getattr(defaults, name) if defaults is not None else field.get_default(call_default_factory=True)
                default = f"`{value!r}`".replace("|", "\\|")
            type_name = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            type_name = type_name.replace("|", "\\|")
            rows.append(f"| `{path}` | {type_name} | {default} | {field.description or ''} |")

    walk(RunConfig, "")
    return "\n".join(rows) + "\n"


def _reference(args) -> int:
    print(config_reference(), end="")
    return 0
