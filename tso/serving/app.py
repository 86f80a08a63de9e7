"""Build and deploy the Serve application of a run config: matrix models, policy, judge, REST ingress.

In code::

    from tso.serving.app import build_app, deploy, swap_checkpoint
    deploy(cfg)                              # serve.start on cfg.serve.host:port, serve.run the app
    swap_checkpoint(cfg, "/runs/x/stage1")   # hot-swap the policy (reconfigure, no restart)

From a Serve config file (``serve run deployments/demo.yaml``): ``import_path:
tso.serving.app:app_from_config`` with ``args: {config: builtin:demo}`` (or a path to a run config).

Deployments are ordinary Serve deployments (they show in the Ray dashboard): ``model-<name>`` per
matrix entry, ``policy`` and ``judge`` (handle-level API: ``tso.serving.deployments``) and
``ingress`` (REST: ``tso.serving.ingress``). Each gets a deterministic Serve version computed from its
code and constructor arguments (name, engine, sampling, judge rubrics). What a stage
changes, the weights served and the matrix facts (role, version, base), is the ``user_config``, so
registering a new policy restarts nothing: Serve calls ``reconfigure`` on the running replicas and only
the new version's deployment (and the ingress, which routes to it) starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from tso.config import ConfigError, RunConfig, is_hub_id, load_config_ref
from tso.models.checkpoint import checkpoint_options, judge_options
from tso.serving.auth import allowed_hosts, require_token_for, resolve_token, token_digest
from tso.serving.client import JUDGE, POLICY, ServeClient, deployment_name
from tso.serving.deployments import JudgeServer, ModelServer
from tso.serving.ingress import RETRY_AFTER_S, Ingress

logger = logging.getLogger(__name__)

INGRESS_NUM_CPUS = 0.1
INGRESS_MAX_ONGOING = 1024
#: a request Serve's proxy refuses for a full queue (of the ingress itself) gets 503 and Retry-After too
BACKPRESSURE = {"status_code": 503, "retry_after_s": RETRY_AFTER_S}


def deployment_names(cfg: RunConfig) -> list[str]:
    """The app's deployments. The base (the current policy) has no matrix deployment of its own: the
    policy deployment serves it until the next stage, which makes it a matrix negative."""
    return [deployment_name(m.name) for m in cfg.matrix.models if m.name != cfg.matrix.base] + [POLICY, JUDGE]


def _code_fingerprint() -> str:
    """Hash of the code a replica runs: a code change restarts replicas, a checkpoint change does not."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for sub in ("engines", "serving"):
        for f in sorted((root / sub).glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    h.update((root / "method" / "judging.py").read_bytes())
    return h.hexdigest()


def _version(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(_code_fingerprint().encode() + blob).hexdigest()[:16]


def _with_version(deployment, version: str):
    """Pin Serve's deployment version (an internal option; without it every redeploy restarts)."""
    try:
        return deployment.options(version=version, _internal=True)
    except (TypeError, ValueError):  # a Ray without the option: redeploys restart instead of reconfiguring
        return deployment


def _options(name: str, engine, resources, user_config: dict, max_queued: int) -> dict:
    actor = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "runtime_env": {"env_vars": {
            "OMP_NUM_THREADS": str(engine.torch_threads),
            "MKL_NUM_THREADS": str(engine.torch_threads),
            "TOKENIZERS_PARALLELISM": "false",
        }},
    }
    opts: dict[str, Any] = {
        "name": name,
        "ray_actor_options": actor,
        # a batch can only be as large as the requests a replica accepts at once
        "max_ongoing_requests": max(resources.max_ongoing_requests, engine.max_batch_size),
        "user_config": user_config,
        "max_queued_requests": max_queued,  # beyond it Serve refuses (a 503 at the REST edge), never queues without end
        "backpressure_config": BACKPRESSURE,
        "health_check_period_s": 10,
        "health_check_timeout_s": 120,  # with engine.generate_on=event_loop it waits for the running batch
        "graceful_shutdown_timeout_s": 30,
    }
    if resources.accelerator_type:
        actor["accelerator_type"] = resources.accelerator_type
    if resources.placement_group_bundles:
        opts["placement_group_bundles"] = [dict(b) for b in resources.placement_group_bundles]
        opts["placement_group_strategy"] = resources.placement_group_strategy
    if resources.autoscaling:
        opts["autoscaling_config"] = dict(resources.autoscaling)
    else:
        opts["num_replicas"] = resources.num_replicas
    return opts


def _roles(cfg: RunConfig) -> dict[str, str]:
    mix = cfg.mixtures()
    roles = {}
    for m in cfg.matrix.models:
        roles[m.name] = ("base" if m.name == cfg.matrix.base else "positive" if m.name in mix.alpha
                         else "negative" if m.name in mix.gamma else "none")
    return roles


def build_app(cfg: RunConfig, checkpoints: dict[str, str] | None = None, source: str = "<config>",
              include: list[str] | None = None) -> Application:
    """The Serve application of a run config.

    ``checkpoints`` maps deployment names (``policy``, ``judge``, ``model-<name>``) to the model
    directory each should serve now (its ``user_config``); by default each serves its configured path
    (the policy: the base model's). ``include`` limits the app to some of those deployments (e.g.
    ``["judge"]`` for a scoring-only service); the ingress is always there and answers 404 for a model
    it does not serve. The bearer token is read now, in the building process, from
    ``serve.auth_token_file`` or the ``serve.auth_token_env`` variable (``tso.serving.auth``: a
    non-loopback ``serve.host`` without one refuses to build); only its SHA-256 reaches the replicas.
    """
    token = resolve_token(cfg.serve, source)
    names = deployment_names(cfg)
    wanted = set(names if include is None else include)
    unknown = (set(checkpoints or {}) | wanted) - set(names)
    if unknown:
        raise ValueError(f"unknown deployments {sorted(unknown)} (have {names})")
    checkpoints = dict(checkpoints or {})
    for name, path in checkpoints.items():
        if not is_hub_id(path) and not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{name}: no Hugging Face model directory at {path} (config.json missing)")
    cfg.require_model_dirs(source)
    roles = _roles(cfg)
    sampling = cfg.pairs.sampling.model_dump()
    base = cfg.matrix.entry(cfg.matrix.base)

    models = {}
    for m in cfg.matrix.models:
        dep = deployment_name(m.name)
        if dep not in wanted or m.name == cfg.matrix.base:
            continue
        kwargs = dict(name=m.name, deployment=dep, engine=m.engine.model_dump(), sampling=sampling, size=m.size,
                      options=checkpoint_options(m))
        state = dict(checkpoint=checkpoints.get(dep, m.path), path=m.path, role=roles[m.name], version=m.version,
                     base=cfg.matrix.base, base_path=base.path)
        d = serve.deployment(ModelServer).options(**_options(dep, m.engine, m.resources, state, cfg.serve.max_queued_requests))
        models[m.name] = _with_version(d, _version(dep, kwargs)).bind(**kwargs)

    policy = None
    if "policy" in wanted:
        kwargs = dict(name="policy", deployment="policy", engine=base.engine.model_dump(), sampling=sampling,
                      size=base.size, options=checkpoint_options(base))
        state = dict(checkpoint=checkpoints.get("policy", base.path), path=base.path, role="policy", version=None,
                     base=base.name, base_path=base.path)
        d = serve.deployment(ModelServer).options(
            **_options("policy", base.engine, base.resources, state, cfg.serve.max_queued_requests))
        policy = _with_version(d, _version("policy", kwargs)).bind(**kwargs)

    judge = None
    if "judge" in wanted:
        judge_cfg = cfg.judge
        uncorrected = judge_cfg.path is None
        judge_path = base.path if uncorrected else judge_cfg.path
        if not is_hub_id(judge_path) and not (Path(judge_path) / "config.json").is_file():
            raise ConfigError(source, "judge.path", f"no model directory at {judge_path} (train the judge first)")
        rubrics = judge_cfg.model_dump(include={"dimensions", "rubrics", "sampling", "answer_format"})
        kwargs = dict(name="judge", deployment="judge", engine=judge_cfg.engine.model_dump(),
                      sampling=judge_cfg.sampling.model_dump(), size=base.size, judge=rubrics, seed=cfg.seed,
                      options=judge_options(cfg))
        state = dict(checkpoint=checkpoints.get("judge", judge_path), path=judge_path, role="judge", version=None,
                     base=base.name, base_path=base.path)
        d = serve.deployment(JudgeServer).options(**_options("judge", judge_cfg.engine, judge_cfg.resources, state,
                                                       cfg.serve.max_queued_requests))
        judge = _with_version(d, _version("judge", kwargs)).bind(**kwargs)
        if uncorrected:
            logger.warning("judge.path is not set: serving the base model %s as the uncorrected judge", base.path)

    limits = ingress_limits(cfg, judge_served=judge is not None)
    digest = token_digest(token) if token else None
    ingress = serve.deployment(Ingress).options(
        name="ingress", num_replicas=cfg.serve.ingress_replicas, max_ongoing_requests=INGRESS_MAX_ONGOING,
        max_queued_requests=cfg.serve.max_queued_requests, backpressure_config=BACKPRESSURE,
        ray_actor_options={"num_cpus": INGRESS_NUM_CPUS},
    )
    ingress = _with_version(ingress, _version("ingress", sorted(wanted), limits, digest, cfg.name))
    return ingress.bind(models=models, policy=policy, judge=judge, limits=limits, token_sha256=digest,
                        title=cfg.name, base=cfg.matrix.base)


def ingress_limits(cfg: RunConfig, judge_served: bool = True) -> dict[str, Any]:
    """What the ingress enforces and states in its OpenAPI: serve.* limits, and the facts it needs to
    count a request's tokens (the default max_new_tokens, the judge's dimensions and answer length)."""
    s = cfg.serve
    limits = s.model_dump(include={"max_body_bytes", "max_field_chars", "max_batch_items", "max_new_tokens", "max_n",
                                   "max_request_tokens", "request_timeout_s", "body_timeout_s", "protect_docs",
                                   "cors_origins", "log_requests"})
    limits.update(allowed_hosts=allowed_hosts(s), default_max_new_tokens=cfg.pairs.sampling.max_new_tokens,
                  judge_max_new_tokens=cfg.judge.sampling.max_new_tokens, judge_dimensions=list(cfg.judge.dimensions),
                  judge_rubrics=sorted(cfg.judge.rubrics) if judge_served else None)
    return limits


def deploy(cfg: RunConfig, blocking: bool = False, *, checkpoints: dict[str, str] | None = None,
           port: int | None = None, source: str = "<config>", include: list[str] | None = None):
    """Start Serve's HTTP proxy on ``cfg.serve.host``:``port`` (default ``cfg.serve.port``) and run the
    app as ``cfg.serve.app_name`` (see ``build_app``). Needs a connected Ray (``ray.init``). Returns the
    ingress handle."""
    name = cfg.settle_app_name("app")
    app = build_app(cfg, checkpoints=checkpoints, source=source, include=include)
    serve.start(http_options={"host": cfg.serve.host, "port": port or cfg.serve.port})
    host, _ = bound_address()  # serve.start keeps a proxy someone else started: check what it binds
    require_token_for(host, resolve_token(cfg.serve, source) is not None, source)
    return serve.run(app, name=name, route_prefix=cfg.serve.route_prefix, blocking=blocking)


def bound_address() -> tuple[str, int]:
    """Where Serve's HTTP proxies really listen: the cluster's Serve settings, which are the first
    ``serve.start``'s (a later one with other options changes nothing)."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    return http.host, http.port


def delete_app(name: str) -> None:
    """Delete one Serve app (its deployments and replicas); other users' apps keep running. Never
    ``serve.shutdown()``: on a shared cluster that stops everyone's apps and the HTTP proxies."""
    import ray

    if not ray.is_initialized():
        return
    try:
        running = serve.status().applications
    except Exception:  # noqa: BLE001 - no Serve controller: nothing to delete
        return
    if name in running:
        serve.delete(name)


def served_checkpoints(cfg: RunConfig, include: list[str] | None = None) -> dict[str, str]:
    """What each deployment of the running app serves now (asks them)."""
    return ServeClient(cfg.serve.app_name).served_checkpoints(include or deployment_names(cfg))


def swap_checkpoint(cfg: RunConfig, checkpoint: str, deployment: str = "policy", port: int | None = None,
                    include: list[str] | None = None) -> None:
    """Hot-swap the weights one deployment serves (the policy after each stage, by default).

    Redeploys the running app (the same ``include`` as it was deployed with) with only that
    deployment's ``user_config`` changed, so Serve calls ``reconfigure`` on its replicas instead of
    restarting them; returns once the app is running again, on the new weights.
    """
    checkpoint = str(Path(checkpoint).resolve())
    current = served_checkpoints(cfg, include)
    current[deployment] = checkpoint
    deploy(cfg, checkpoints=current, port=port, include=include)
    require_served(cfg, {deployment: checkpoint})


def require_served(cfg: RunConfig, expected: dict[str, str]) -> None:
    """Raise unless each deployment serves the checkpoint it should (a failed swap keeps the old
    weights serving and records why: say so here rather than run on the wrong model)."""
    client = ServeClient(cfg.serve.app_name)
    for name, path in expected.items():
        info = client.handle(name).info.remote().result()
        if info["checkpoint"] != path:
            raise RuntimeError(f"deployment {name!r} still serves {info['checkpoint']}, not {path}: "
                               f"{info.get('load_error') or 'the swap did not happen'}")


def app_from_config(args: dict[str, Any]) -> Application:
    """Serve application builder for Serve config files: ``args: {config: builtin:demo | <path>,
    checkpoints: {policy: <dir>, ...}}`` (checkpoints optional)."""
    args = dict(args or {})
    unknown = set(args) - {"config", "checkpoints"}
    if unknown:
        raise ValueError(f"unknown args {sorted(unknown)} (have: config, checkpoints)")
    cfg, source = load_config_ref(str(args.get("config", "builtin:demo")))
    try:  # the Serve config's http_options decide where the app is reachable, not the run config
        host, _ = bound_address()
    except Exception:  # noqa: BLE001 - built outside a cluster with Serve running: the run config's host
        host = cfg.serve.host
    require_token_for(host, resolve_token(cfg.serve, source) is not None, f"{source} (served on {host})")
    return build_app(cfg, checkpoints=args.get("checkpoints"), source=source)
