"""`tso zoo build|show|prompts|feedback`: the embedded default's model matrix and data files."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path


def _home(args) -> Path:
    from tso.config import tso_home

    if args.home:
        os.environ["TSO_HOME"] = str(Path(args.home).expanduser().resolve())
    return tso_home()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="the embedded default: tiny model matrix and toy-world data")
    zsub = p.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)

    b = zsub.add_parser("build", help="train the tiny model matrix on CPU and check its quality ladder")
    b.add_argument("--home", help="TSO_HOME to build under (default $TSO_HOME or ~/.cache/tso)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild models that are already built")
    b.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out 'eval' prompts to score each model on (default 350; the ladder needs >= 300)")
    b.add_argument("--workers", type=int, default=None,
                   help="processes training the size chains in parallel (default min(2, cores); 1 = in-process)")
    b.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    b.add_argument("--fixture", action="store_true", help="build the tiny test fixture matrix instead")
    b.add_argument("--check-ladder", action="store_true",
                   help="enforce the quality ladder on the fixture matrix too (the demo matrix always does)")
    b.add_argument("--no-data", action="store_true", help="do not write prompts/feedback files to $TSO_HOME/data")
    b.set_defaults(func=_build)

    s = zsub.add_parser("show", help="print the matrix as a table")
    s.add_argument("--home")
    s.add_argument("--json", action="store_true", help="print the manifest as JSON")
    s.set_defaults(func=_show)

    pr = zsub.add_parser("prompts", help="write the train/pref/eval prompt files (JSONL) to $TSO_HOME/data")
    pr.add_argument("--home")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", help="folder (default $TSO_HOME/data)")
    for split, n in (("train", 7000), ("pref", 1400), ("eval", 700)):
        pr.add_argument(f"--n-{split}", type=int, default=n, help=f"{split} prompts (default {n})")
    pr.set_defaults(func=_prompts)

    f = zsub.add_parser("feedback", help="write judge feedback files (JSONL) to $TSO_HOME/data")
    f.add_argument("--home")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", help="folder (default $TSO_HOME/data)")
    f.add_argument("--n-train", type=int, default=1500, help="tasks for feedback_train.jsonl")
    f.add_argument("--n-eval", type=int, default=300, help="tasks for feedback_eval.jsonl (held-out tasks)")
    f.add_argument("--answers-per-task", type=int, default=2)
    f.add_argument("--ai-fraction", type=float, default=0.5)
    f.add_argument("--ai-noise", type=float, default=1.0)
    f.add_argument("--no-models", action="store_true", help="do not add answers of the built matrix's models")
    f.set_defaults(func=_feedback)


def _build(args) -> int:
    from tso.zoo.build import build_matrix
    from tso.zoo.data import write_data
    from tso.zoo.manifest import format_table
    from tso.zoo.spec import DEMO_MATRIX, FIXTURE_MATRIX

    home = _home(args)
    spec = FIXTURE_MATRIX if args.fixture else DEMO_MATRIX
    if args.check_ladder:
        spec = replace(spec, enforce_ladder=True)
    manifest = build_matrix(home, spec, seed=args.seed, force=args.force, eval_prompts=args.eval_prompts,
                            threads=args.threads, workers=args.workers or (1 if args.fixture else None))
    if not args.no_data:
        for path in write_data(home, seed=args.seed, use_models=True, sizes=spec.name):
            print(f"zoo: wrote {path}")
    print(format_table(manifest))
    if manifest["status"] != "ok":
        print("error: the quality ladder does not hold (manifest marked failed):", file=sys.stderr)
        for r in manifest["reasons"]:
            print(f"  - {r}", file=sys.stderr)
        return 1
    return 0


def _show(args) -> int:
    from tso.zoo.build import zoo_dir
    from tso.zoo.manifest import format_table, read_manifest

    home = _home(args)
    manifest = read_manifest(zoo_dir(home))
    if manifest is None:
        print(f"error: no matrix under {zoo_dir(home)}: build it with `tso zoo build`", file=sys.stderr)
        return 1
    print(json.dumps(manifest, indent=2) if args.json else format_table(manifest))
    return 0 if manifest.get("status") == "ok" else 1


def _prompts(args) -> int:
    from tso.zoo.data import write_prompts

    home = _home(args)
    for path in write_prompts(Path(args.out) if args.out else home / "data", seed=args.seed,
                              n_train=args.n_train, n_pref=args.n_pref, n_eval=args.n_eval):
        print(f"wrote {path}")
    return 0


def _feedback(args) -> int:
    from tso.zoo.data import one_thread, write_feedback

    home = _home(args)
    with one_thread():
        paths = write_feedback(home, out=Path(args.out) if args.out else None, seed=args.seed,
                               n_train=args.n_train, n_eval=args.n_eval, answers_per_task=args.answers_per_task,
                               ai_fraction=args.ai_fraction, ai_noise=args.ai_noise,
                               use_models=not args.no_models)
    for path in paths:
        print(f"wrote {path}")
    return 0
