"""`tso run CONFIG`, `tso demo`, `tso report RUN_DIR`."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the full T-stage TSO pipeline (resumes an interrupted run)")
    p.add_argument("config", help="run config YAML, or builtin:NAME")
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines listed in the config")
    p.add_argument("--keep-serving", action="store_true", help="leave the Serve app running at the end")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set stages=1 --set run_dir=/tmp/r (YAML values)")
    p.set_defaults(func=_run)

    d = sub.add_parser("demo", help="the embedded default: build the tiny matrix if missing, run toy TSO end to end")
    d.add_argument("--run-dir", default=None, help="default: runs/demo")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.set_defaults(func=_demo)

    r = sub.add_parser("report", help="write RUN_DIR/report.md from what a run wrote")
    r.add_argument("run_dir")
    r.set_defaults(func=_report)


def _overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _load(ref: str, sets: list[str]):
    from tso.config import load_config, resolve_config_ref

    path = resolve_config_ref(ref)
    return load_config(path, _overrides(sets)), str(path)


def _run(args) -> int:
    from tso.run.pipeline import run_pipeline

    cfg, source = _load(args.config, args.set)
    result = run_pipeline(cfg, source, with_baselines=not args.no_baselines, keep_serving=args.keep_serving or None)
    print(f"[tso] done: {result['report']}")
    return 0


def _demo(args) -> int:
    from pathlib import Path

    from tso.config import tso_home
    from tso.run.pipeline import run_pipeline

    start = time.perf_counter()
    sets = list(args.set)
    if args.run_dir:
        sets.append(f"run_dir={args.run_dir}")
    # Always through the build: it skips every model already built with the current settings (a few
    # seconds), and rebuilds what an older tso built differently, so the demo never runs a stale matrix.
    manifest = tso_home() / "zoo" / "manifest.json"
    if not manifest.is_file():
        print("[demo] the tiny model matrix is not built yet: building it (once, cached in $TSO_HOME)")
    from tso.cli import main as tso_main

    code = tso_main(["zoo", "build"])
    if code:
        return code
    cfg, source = _load("builtin:demo", sets)
    result = run_pipeline(cfg, source)
    print(Path(result["report"]).read_text())
    print(f"[demo] total {time.perf_counter() - start:.0f} s; report at {result['report']}")
    return 0


def _report(args) -> int:
    from tso.run.report import write_report

    path = write_report(args.run_dir)
    print(path.read_text())
    return 0
