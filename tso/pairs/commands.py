"""`tso pairs CONFIG`: form one stage's preference pairs through the Serve deployments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tso.commands import add_set_argument
from tso.io import RunDirLocked, lock_if_under, pairs_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pairs", help="form preference pairs (Ray Data through the Serve deployments)")
    p.add_argument("config", help="run config YAML, or builtin:NAME")
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--out", default=None, help="output directory (default <run_dir>/stage-<N>/pairs)")
    p.add_argument("--policy", default=None, help="the policy's model directory (default: the base model)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per Ray Data batch")
    p.add_argument("--concurrency", type=int, default=2, help="Ray Data actors calling the deployments")
    p.add_argument("--local", action="store_true", help="no Ray: run the same engines in this process")
    add_set_argument(p)
    p.set_defaults(func=_pairs)


def _pairs(args) -> int:
    import json

    from tso.config import load_config_ref
    from tso.models.preflight import check_models

    cfg, path = load_config_ref(args.config, args.set)
    check_models(cfg, path)
    out = Path(args.out or pairs_dir(cfg.run_dir, args.stage)).absolute()
    try:
        with lock_if_under(out, cfg.run_dir, f"tso pairs --stage {args.stage} ({out})"):
            res = _form(cfg, args, path, out)
    except RunDirLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res["summary"], indent=2))
    print(f"pairs: {res['pairs_path']}\nsummary: {res['summary_path']}\nrejects: {res['rejects_path']}")
    return 0


def _form(cfg, args, path, out: Path) -> dict:
    from tso.pairs.pipeline import form_pairs_step

    if args.local:
        from tso.serving.client import InProcessClient

        return form_pairs_step(cfg, args.stage, out, client=InProcessClient(cfg, policy_path=args.policy),
                               batch_size=args.batch_size)
    from tso.cluster import connect_ray
    from tso.serving.app import deploy

    cfg.settle_app_name("pairs")
    connect_ray()
    deploy(cfg, checkpoints={"policy": str(Path(args.policy).absolute())} if args.policy else None, source=str(path))
    return form_pairs_step(cfg, args.stage, out, app_name=cfg.serve.app_name, batch_size=args.batch_size,
                           concurrency=args.concurrency)
