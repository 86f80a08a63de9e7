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
"""

from __future__ import annotations

from typing import Protocol

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


class ServeClient:
    """Deployment handles of a running tso Serve application."""

    def __init__(self, app_name: str, chunk: int = 64):
        self.app_name = app_name
        self.chunk = chunk  # requests per handle call (Serve's per-call overhead is paid per chunk)
        self._handles: dict[str, object] = {}

    def handle(self, deployment: str):
        if deployment not in self._handles:
            from ray import serve

            self._handles[deployment] = serve.get_deployment_handle(deployment, app_name=self.app_name)
        return self._handles[deployment]

    def generate(self, requests: list[tuple[str, dict]]) -> list[dict]:
        by_deployment: dict[str, list[int]] = {}
        for i, (model, _) in enumerate(requests):
            by_deployment.setdefault(deployment_name(model), []).append(i)
        calls = []  # (indices, response): every chunk of every deployment in flight at once
        for deployment, indices in by_deployment.items():
            handle = self.handle(deployment)
            for chunk in _chunks(indices, self.chunk):
                calls.append((chunk, handle.generate_many.remote([requests[i][1] for i in chunk],
                                                                 return_exceptions=True)))
        out: list = [None] * len(requests)
        for chunk, response in calls:
            for i, result in zip(chunk, response.result()):
                out[i] = result
        return out

    def score(self, requests: list[dict]) -> list[dict]:
        judge = self.handle(JUDGE)
        calls = [judge.score_many.remote(chunk, return_exceptions=True, too_long="unscored")
                 for chunk in _chunks(list(requests), self.chunk)]
        return [result for call in calls for result in call.result()]

    def served_checkpoints(self, deployments: list[str]) -> dict[str, str]:
        """What each deployment serves now (asks them)."""
        return {name: self.handle(name).info.remote().result()["checkpoint"] for name in deployments}


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
        self.defaults = cfg.pairs.sampling

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
