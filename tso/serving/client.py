"""The one client of the tso deployments: the only code that fetches Serve handles and calls them.

Pair formation, evaluation and the run talk to the models through a ``ModelClient``:

- ``ServeClient`` calls the long-lived Ray Serve deployments of a running app (the production path);
- ``InProcessClient`` runs the same engines and judge logic in this process without Ray (the
  pair-formation benchmark's baseline, and a way to debug on one machine).

Both take all of a batch's requests at once, so the replicas batch them (``@serve.batch``) and the
local engines get one call per model. A request at fault answers ``{"error": {"code", "message",
...}}`` in its place and the others of the call are answered; a judge prompt too long for the
judge is unscored (reason ``too_long``). Deployment names: ``model-<name>`` per matrix model,
``policy`` and ``judge``.

Faults: every handle call of ``ServeClient`` waits at most ``timeout_s`` (``serve.call_timeout_s``) and a
call that failed for a reason another try can fix (its replica died while it ran, Serve answered
unavailable or back-pressure, no answer in time) is sent again, up to ``retries`` times
(``serve.call_retries``) after 1, 2, 4 ... s (capped). Re-sending is safe: generation is keyed by the
requests' seeds, so a retry gets the same answers. Anything else (an input error, a bug) is raised at
once. Each retry logs one line: deployment, attempt, error type.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from tso.config import ServeConfig

logger = logging.getLogger(__name__)

POLICY = "policy"
JUDGE = "judge"


def deployment_name(model: str) -> str:
    """The Serve deployment of a matrix model name, "policy" or "judge"."""
    return model if model in (POLICY, JUDGE) else f"model-{model}"


class ModelClient(Protocol):
    def generate(self, requests: list[tuple[str, dict]]) -> list[dict]:
        """[(model name or "policy", request)] -> [{"texts", "finish_reasons", "stop_tokens", ...} | error]"""

    def score(self, requests: list[dict]) -> list[dict]:
        """[{"prompt", "response"}] -> [{"score": float | None, "reason": str | None, ...} | error]"""


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


DEFAULT_TIMEOUT_S = ServeConfig.model_fields["call_timeout_s"].default
DEFAULT_RETRIES = ServeConfig.model_fields["call_retries"].default


def retryable(error: BaseException) -> bool:
    """Whether another try can fix a failed handle call: the replica died or was unreachable, Serve
    answered unavailable or back-pressure, the call was cancelled or timed out. An exception raised by
    the deployment's own code (a RayTaskError: bad input, a bug) is not."""
    from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
        RequestCancelledError,
    )

    if isinstance(error, RayTaskError):
        return False
    return isinstance(error, (RayActorError, ObjectLostError, BackPressureError, DeploymentUnavailableError,
                              ReplicaUnavailableError, RequestCancelledError, TimeoutError))


class ServeClient:
    """Deployment handles of a running tso Serve application, with timeouts and retries."""

    def __init__(self, app_name: str, chunk: int = 64, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, backoff_s: float = 1.0, backoff_cap_s: float = 30.0):
        self.app_name = app_name
        self.chunk = chunk  # requests per handle call (Serve's per-call overhead is paid per chunk)
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.backoff_cap_s = backoff_s, backoff_cap_s
        self._handles: dict[str, object] = {}

    @classmethod
    def from_config(cls, cfg, app_name: str | None = None, **kwargs) -> ServeClient:
        """The run config's app, call timeout and retries."""
        return cls(app_name or cfg.serve.app_name, timeout_s=cfg.serve.call_timeout_s,
                   retries=cfg.serve.call_retries, **kwargs)

    def handle(self, deployment: str):
        if deployment not in self._handles:
            from ray import serve

            self._handles[deployment] = serve.get_deployment_handle(deployment, app_name=self.app_name)
        return self._handles[deployment]

    def call(self, calls: list[tuple[str, str, tuple, dict]]) -> list:
        """Results of (deployment, method, args, kwargs) handle calls, all in flight at once; the calls
        that failed retryably are sent again together after a backoff (the others keep their results)."""
        out: list = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(self.retries + 1):
            sent = [(i, self._send(*calls[i])) for i in todo]
            todo = []
            for i, response in sent:
                try:
                    out[i] = self._wait(response)
                except Exception as e:
                    if attempt == self.retries or not retryable(e):
                        raise
                    todo.append(i)
                    logger.warning("%s.%s of app %s: attempt %d of %d failed (%s), retrying", calls[i][0],
                                   calls[i][1], self.app_name, attempt + 1, self.retries + 1, type(e).__name__)
            if not todo:
                break
            time.sleep(min(self.backoff_s * 2 ** attempt, self.backoff_cap_s))
        return out

    def _send(self, deployment: str, method: str, args: tuple, kwargs: dict):
        try:
            return getattr(self.handle(deployment), method).remote(*args, **kwargs)
        except Exception as e:  # surfaced (and judged retryable or not) where the result is awaited
            return e

    def _wait(self, response):
        if isinstance(response, Exception):
            raise response
        try:
            return response.result(timeout_s=self.timeout_s)
        except TimeoutError:
            response.cancel()  # best effort: the replica need not finish work nobody waits for
            raise

    def generate(self, requests: list[tuple[str, dict]]) -> list[dict]:
        by_deployment: dict[str, list[int]] = {}
        for i, (model, _) in enumerate(requests):
            by_deployment.setdefault(deployment_name(model), []).append(i)
        chunks, calls = [], []  # every chunk of every deployment in flight at once
        for deployment, indices in by_deployment.items():
            for chunk in _chunks(indices, self.chunk):
                chunks.append(chunk)
                calls.append((deployment, "generate_many", ([requests[i][1] for i in chunk],),
                              {"return_exceptions": True}))
        out: list = [None] * len(requests)
        for chunk, results in zip(chunks, self.call(calls)):
            for i, result in zip(chunk, results):
                out[i] = result
        return out

    def score(self, requests: list[dict]) -> list[dict]:
        calls = [(JUDGE, "score_many", (chunk,), {"return_exceptions": True, "too_long": "unscored"})
                 for chunk in _chunks(list(requests), self.chunk)]
        return [result for results in self.call(calls) for result in results]

    def served_checkpoints(self, deployments: list[str]) -> dict[str, str]:
        """What each deployment serves now (asks them)."""
        infos = self.call([(name, "info", (), {}) for name in deployments])
        return {name: info["checkpoint"] for name, info in zip(deployments, infos)}


class InProcessClient:
    """The same engines and judge logic in one process, no Ray: the pipeline's overhead baseline."""

    def __init__(self, cfg, policy_path: str | None = None, judge_path: str | None = None):
        from tso.engines.factory import make_engine
        from tso.models.checkpoint import checkpoint_options, judge_options
        from tso.serving.judge import JudgeScorer

        self.engines = {m.name: make_engine(m.engine, m.path, checkpoint_options(m)) for m in cfg.matrix.models}
        base = cfg.matrix.entry(cfg.matrix.base)
        self.engines[POLICY] = make_engine(base.engine, policy_path or base.path, checkpoint_options(base))
        judge_engine = make_engine(cfg.judge.engine, judge_path or cfg.judge.path or base.path, judge_options(cfg))
        self.judge = JudgeScorer(cfg.judge, judge_engine, seed=cfg.seed)
        self.judge_engine = judge_engine
        self.defaults = cfg.pairs.sampling

    def served_checkpoints(self, deployments: list[str]) -> dict[str, str]:
        """What each engine serves, under its deployment's name (as ``ServeClient`` answers)."""
        engines = {deployment_name(name): engine for name, engine in self.engines.items()}
        engines[JUDGE] = self.judge_engine
        return {name: engines[name].checkpoint for name in deployments}

    def generate(self, requests: list[tuple[str, dict]]) -> list[dict]:
        from tso.engines.requests import generate_requests

        out: list[dict | None] = [None] * len(requests)
        by_model: dict[str, list[int]] = {}
        for i, (model, _) in enumerate(requests):
            by_model.setdefault(model, []).append(i)
        for model, idx in by_model.items():
            results = generate_requests(self.engines[model], [requests[i][1] for i in idx], self.defaults, model,
                                        return_exceptions=True)
            for i, res in zip(idx, results):
                out[i] = _as_dict(res)
        return out  # type: ignore[return-value]

    def score(self, requests: list[dict]) -> list[dict]:
        return [_as_dict(r) for r in self.judge.score_batch(requests, return_exceptions=True, too_long="unscored")]


def _as_dict(result) -> dict:
    from tso.engines.base import EngineInputError
    from tso.engines.requests import error_dict

    return error_dict(result) if isinstance(result, EngineInputError) else result
