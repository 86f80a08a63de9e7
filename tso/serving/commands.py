"""`tso serve CONFIG [--port N] [--blocking]`: the matrix, policy and judge as Serve deployments."""

from __future__ import annotations

import argparse
import time

from tso.commands import add_set_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model matrix, the policy and the judge (Ray Serve, REST API)",
        description=(
            "Deploy a run config's matrix models, policy and judge as Ray Serve deployments with a REST "
            "API (docs at /docs). Joins the cluster named by RAY_ADDRESS (RAY_ADDRESS=auto for one started "
            "with `ray start --head --num-cpus 8`) or starts a local one with 8 logical CPUs; a local "
            "cluster lives as long as this command, so serving then blocks until Ctrl-C."
        ),
    )
    p.add_argument("config", help="run config YAML (e.g. tso/configs/demo.yaml)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port of the config)")
    p.add_argument("--blocking", action="store_true", help="keep running (and serving) until Ctrl-C")
    add_set_argument(p)
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from tso.cluster import connect_ray
    from tso.config import load_config_ref
    from tso.models.preflight import check_models
    from tso.serving.app import bound_address, delete_app, deploy
    from tso.serving.auth import resolve_token

    cfg, source = load_config_ref(args.config, args.set)
    token = resolve_token(cfg.serve, source)  # fail closed before anything starts: a public host needs a token
    check_models(cfg, source)  # before starting anything: a missing model says how to build it
    cfg.settle_app_name("serve")
    started_here = connect_ray()
    deploy(cfg, port=args.port or cfg.serve.port, source=source)
    host, port = bound_address()
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{cfg.serve.route_prefix.rstrip('/')}"
    print(f"tso: app {cfg.serve.app_name!r} is running at {url} (docs: {url}/docs"
          f"{', bearer token required' if token else ''}; deployments: {', '.join(_names(cfg))})", flush=True)
    if (host, port) != (cfg.serve.host, args.port or cfg.serve.port):
        print(f"tso: note: Serve was already running on this cluster and binds {host}:{port}, "
              f"not the configured {cfg.serve.host}:{args.port or cfg.serve.port}", flush=True)
    if not (args.blocking or started_here):
        return 0
    if started_here and not args.blocking:
        print("tso: this command started the Ray cluster, so it keeps serving until Ctrl-C", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("tso: stopping the app", flush=True)
        delete_app(cfg.serve.app_name)
    return 0


def _names(cfg) -> list[str]:
    from tso.serving.app import deployment_names

    return deployment_names(cfg) + ["ingress"]
