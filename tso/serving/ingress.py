"""The REST API: a FastAPI app on a Serve ingress deployment, in front of the model deployments.

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``)::

    POST /v1/score         {"prompt", "response", "dimension"?}   -> ScoreResponse
    POST /v1/score/batch   {"items": [...]} (<= serve.max_batch_items) -> {"results": [...]}
    POST /v1/generate      {"model", "prompt", "n", "temperature", "top_p", "max_new_tokens", "seed"}
    POST /v1/chat/completions, /v1/completions   OpenAI's shapes (tso.serving.openai_api)
    GET  /v1/models        OpenAI's model list; each entry with tso's name, version, size, role, checkpoint
    GET  /healthz          liveness (never behind the token)

Errors are answers with a reason, never crashes (every status is in the OpenAPI):
400 a Host header the API does not serve or a bad Content-Length; 401 a missing or wrong bearer token;
404 an unknown model; 408 a body slower than ``serve.body_timeout_s``; 413 a body, text field, batch,
sample count, token count or token budget over its limit, or a prompt longer than the model's
context (the limit is in the answer); 422 malformed or non-strict JSON (NaN, 1e400, lone surrogates,
nesting deeper than 64) and values out of range; 503 a deployment that is full or has no live
replica (with Retry-After); 504 a request over ``serve.request_timeout_s``.

Auth (tso.serving.auth): with a token every route but /healthz needs ``Authorization: Bearer <token>``
(/docs and /openapi.json too unless ``serve.protect_docs`` is off); without one the app only binds
loopback. The limits in the served OpenAPI are the ones enforced here (tso.serving.openapi).
"""

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from tso.engines.base import EngineInputError
from tso.engines.requests import prompt_chars
from tso.serving.auth import token_matches
from tso.serving.guard import RequestGuard
from tso.serving.openai_api import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelList,
    chat_completion,
    completion,
    model_list,
)
from tso.serving.openapi import state_limits
from tso.serving.schemas import (
    ErrorResponse,
    GenerateBody,
    GenerateResponse,
    ModelInfo,
    ScoreBatchBody,
    ScoreBatchResponse,
    ScoreBody,
    ScoreResponse,
)

logger = logging.getLogger("ray.serve")

_ERRORS = {
    400: "a Host header this API does not serve, or a bad Content-Length",
    401: "missing or wrong bearer token",
    404: "unknown model",
    408: "the request body arrived too slowly",
    413: "body, field, batch, samples, tokens or prompt over a limit (the limit is in the answer)",
    422: "malformed or non-strict JSON, or a value out of range",
    503: "the deployment is full or has no live replica: retry after Retry-After seconds",
    504: "the request ran longer than serve.request_timeout_s",
}
ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in _ERRORS.items()}
GET_ERRORS = {s: ERRORS[s] for s in (400, 401, 503, 504)}
RETRY_AFTER_S = 1
RESEND_AFTER_S = (0.5, 2.0)  # a call whose replica died is sent again after these pauses, then 503


class ASCIIJSONResponse(JSONResponse):
    """Escapes non-ASCII, so any text a model or a client produced renders (a lone surrogate too)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _input_error(e: EngineInputError, where: str = "") -> HTTPException:
    detail: dict[str, Any] = {"error": getattr(e, "code", "invalid_request"), "message": where + e.message}
    detail.update(e.details)
    return HTTPException(status_code=getattr(e, "status", 422), detail=detail)


def _over(field: str, value: int, limit: int, what: str, error: str = "over_limit") -> HTTPException:
    return HTTPException(413, detail={"error": error, "field": field, "value": value, "limit": limit,
                                      "message": f"{field} is {value} {what}; the limit is {limit}"})


def _field_limit(name: str, length: int, limit: int) -> HTTPException:
    return HTTPException(413, detail={"error": "field_too_long", "field": name, "length": length, "limit": limit,
                                      "message": f"{name} is {length} characters; the limit is {limit}"})


def _unavailable(message: str) -> HTTPException:
    return HTTPException(503, detail={"error": "unavailable", "message": message, "retry_after_s": RETRY_AFTER_S},
                         headers={"Retry-After": str(RETRY_AFTER_S)})


@serve.ingress()
class Ingress:
    """Routes REST requests to the deployments through their handles."""

    def __init__(self, *, models: dict, policy, judge, limits: dict, token_sha256: str | None,
                 title: str = "tso", base: str | None = None):
        self.models = dict(models)  # matrix name -> handle of model-<name>
        self.policy, self.judge = policy, judge
        self.base = base  # the matrix name the policy deployment serves (it has no deployment of its own)
        self.created = int(time.time())
        self.limits = dict(limits)  # tso.serving.app.ingress_limits: serve.* limits, judge and sampling facts
        self.max_field_chars = int(limits["max_field_chars"])
        self.max_batch_items = int(limits["max_batch_items"])
        self.timeout_s = float(limits["request_timeout_s"])
        self.token_sha256 = token_sha256
        self.title = title

    # -- helpers

    def _served(self) -> list[str]:
        names = sorted(self.models) + (["policy"] if self.policy is not None else [])
        return names + ([self.base] if self.base and self.policy is not None and self.base not in names else [])

    def _handle(self, model: str):
        if model in ("policy", self.base) and self.policy is not None:
            return self.policy
        if model in self.models:
            return self.models[model]
        raise HTTPException(404, detail={"error": "unknown_model", "model": model[:128],
                                         "message": f"no model {model[:128]!r}", "models": self._served()})

    async def _call(self, send, what: str):
        """``send()``'s handle call within the request timeout; Serve's and the replica's failures as
        answers (Serve may refuse a call when it is sent or when it is awaited). A call whose replica
        died under it is sent again (``RESEND``): Serve routes it to a live or restarted replica, and
        a seeded request gets the same answer."""
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(len(RESEND_AFTER_S) + 1):
            response = None
            try:
                response = send()
                return await asyncio.wait_for(response, max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                if response is not None:
                    response.cancel()
                raise HTTPException(504, detail={"error": "timeout", "limit_s": self.timeout_s,
                                                 "message": f"{what} took longer than {self.timeout_s:g} s"}) from None
            except EngineInputError:
                raise
            except BackPressureError:
                raise _unavailable(f"{what}: the deployment's queue is full") from None
            except DeploymentUnavailableError as e:
                raise _unavailable(f"{what}: no live replica ({type(e).__name__})") from None
            except (ReplicaUnavailableError, RayActorError) as e:
                if attempt == len(RESEND_AFTER_S) or time.monotonic() + RESEND_AFTER_S[attempt] >= deadline:
                    raise _unavailable(f"{what}: no live replica ({type(e).__name__})") from None
                logger.warning("%s: its replica failed (%s), sending it again", what, type(e).__name__)
                await asyncio.sleep(RESEND_AFTER_S[attempt])

    def _check_generation(self, request: dict, chars: int) -> dict:
        """serve.max_n, serve.max_new_tokens and the request's token budget; the default filled in."""
        lim = self.limits
        if chars > self.max_field_chars:
            raise _field_limit("prompt", chars, self.max_field_chars)
        n = request.get("n") or 1
        if n > lim["max_n"]:
            raise _over("n", n, lim["max_n"], "samples")
        tokens = request.get("max_new_tokens")
        if tokens is not None and tokens > lim["max_new_tokens"]:
            raise _over("max_new_tokens", tokens, lim["max_new_tokens"], "tokens")
        if tokens is None:
            tokens = min(lim["default_max_new_tokens"], lim["max_new_tokens"])
        if n * tokens > lim["max_request_tokens"]:
            raise _over("n x max_new_tokens", n * tokens, lim["max_request_tokens"], "tokens", "over_token_budget")
        return {**request, "max_new_tokens": tokens}

    def _check_openai(self, body) -> None:
        """Both OpenAI token fields against serve.max_new_tokens (only one of them is used)."""
        for field in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, field)
            if value is not None and value > self.limits["max_new_tokens"]:
                raise _over(field, value, self.limits["max_new_tokens"], "tokens")

    def _check_score(self, items: list[ScoreBody], batch: bool = False) -> None:
        budget, per_dim = self.limits["max_request_tokens"], self.limits["judge_max_new_tokens"]
        tokens = 0
        for i, item in enumerate(items):
            where = f"items[{i}]." if batch else ""
            for name, length in (("prompt", prompt_chars(item.prompt)), ("response", len(item.response))):
                if length > self.max_field_chars:
                    raise _field_limit(where + name, length, self.max_field_chars)
            tokens += per_dim * (1 if item.dimension else len(self.limits["judge_dimensions"]))
        if tokens > budget:
            raise _over("judge tokens (items x dimensions x judge max_new_tokens)", tokens, budget, "tokens",
                        "over_token_budget")

    async def _score(self, body: ScoreBody, where: str = "") -> dict:
        if self.judge is None:
            raise HTTPException(404, detail={"error": "no_judge", "message": "this app serves no judge"})
        try:
            return await self._call(lambda: self.judge.score.remote(body.model_dump()), "scoring")
        except EngineInputError as e:
            raise _input_error(e, where) from None

    def _log(self, route: str, request: dict, result: dict | None = None) -> None:
        """Sizes at DEBUG; prompts and answers only with serve.log_requests (never a header)."""
        if self.limits.get("log_requests"):
            logger.info("%s %s -> %s", route, json.dumps(request, ensure_ascii=True)[:2000],
                        json.dumps(result, ensure_ascii=True)[:2000])
        else:
            logger.debug("%s: %d request bytes", route, len(json.dumps(request, ensure_ascii=True)))

    # -- the app

    def __serve_build_asgi_app__(self) -> FastAPI:
        protected_docs = self.token_sha256 is not None and self.limits.get("protect_docs", True)
        app = FastAPI(
            title=f"{self.title}: TSO model matrix and judge",
            description=(__doc__ or "").split("\n\n")[0],
            version="1",
            default_response_class=ASCIIJSONResponse,
            docs_url=None if protected_docs else "/docs",
            openapi_url=None if protected_docs else "/openapi.json",
            redoc_url=None,
        )
        if self.limits.get("cors_origins"):
            from fastapi.middleware.cors import CORSMiddleware

            app.add_middleware(CORSMiddleware, allow_origins=list(self.limits["cors_origins"]),
                               allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
        app.add_middleware(RequestGuard, max_bytes=int(self.limits["max_body_bytes"]),
                           body_timeout_s=float(self.limits["body_timeout_s"]),
                           allowed_hosts=list(self.limits["allowed_hosts"]))
        bearer = HTTPBearer(auto_error=False, description="the token of serve.auth_token_env / serve.auth_token_file")

        async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
            if self.token_sha256 is None:
                return
            if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials.strip():
                raise HTTPException(401, detail="a bearer token is required (Authorization: Bearer <token>)",
                                    headers={"WWW-Authenticate": "Bearer"})
            if not token_matches(credentials.credentials, self.token_sha256):
                raise HTTPException(401, detail="wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

        auth = [Depends(authorize)] if self.token_sha256 is not None else []
        base_openapi = app.openapi

        def openapi() -> dict:
            if app.openapi_schema is None:
                app.openapi_schema = state_limits(
                    base_openapi(), max_field_chars=self.max_field_chars, max_batch_items=self.max_batch_items,
                    max_n=self.limits["max_n"], max_new_tokens=self.limits["max_new_tokens"],
                    models=self._served(), dimensions=self.limits.get("judge_rubrics"))
            return app.openapi_schema

        app.openapi = openapi

        if protected_docs:
            @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
            async def openapi_json() -> dict:
                return app.openapi()

            @app.get("/docs", include_in_schema=False, dependencies=auth)
            async def docs():
                return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

        @app.exception_handler(RequestValidationError)
        async def _invalid(_: Request, e: RequestValidationError):
            """FastAPI's 422 without the rejected input (it may be what cannot be rendered)."""
            errors = [{"loc": [p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
                       "msg": str(err.get("msg", "invalid")), "type": str(err.get("type", "value_error"))}
                      for err in e.errors()[:20]]
            return ASCIIJSONResponse(status_code=422, content={"detail": errors})

        @app.exception_handler(EngineInputError)
        async def _engine_input(_: Request, e: EngineInputError):  # any that escaped a route
            err = _input_error(e)
            return ASCIIJSONResponse(status_code=err.status_code, content={"detail": err.detail})

        @app.get("/healthz")
        async def healthz() -> dict:
            return {"status": "ok"}

        @app.get("/v1/models", response_model=ModelList, dependencies=auth, responses=GET_ERRORS)
        async def models() -> dict:
            """OpenAI's model list; each entry also holds tso's fields (role, version, checkpoint, ...)."""
            handles = [h for h in (*self.models.values(), self.policy, self.judge) if h is not None]
            infos = await asyncio.gather(*(self._call(h.info.remote, "model info") for h in handles))
            return model_list([{k: v for k, v in i.items() if k in ModelInfo.model_fields} for i in infos], self.created)

        async def _generate(model: str, request: dict, chars: int) -> dict:
            handle = self._handle(model)
            request = self._check_generation(request, chars)
            try:
                result = await self._call(lambda: handle.generate.remote(request), f"generation by {model}")
            except EngineInputError as e:
                raise _input_error(e) from None
            self._log(f"generate {model}", request, result)
            return result

        @app.post("/v1/generate", response_model=GenerateResponse, dependencies=auth, responses=ERRORS)
        async def generate(body: GenerateBody) -> dict:
            return await _generate(body.model, body.model_dump(exclude={"model"}), prompt_chars(body.prompt))

        @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=auth, responses=ERRORS)
        async def chat_completions(body: ChatCompletionRequest) -> dict:
            """OpenAI's chat completion: the messages through the model's chat template."""
            self._check_openai(body)
            result = await _generate(body.model, body.generation_request([m.model_dump() for m in body.messages]),
                                     prompt_chars(body.messages))
            return chat_completion(body.model, result)

        @app.post("/v1/completions", response_model=Completion, dependencies=auth, responses=ERRORS)
        async def completions(body: CompletionRequest) -> dict:
            """OpenAI's (legacy) completion: the prompt is raw text the model continues."""
            self._check_openai(body)
            result = await _generate(body.model, body.generation_request(body.prompt), len(body.prompt))
            return completion(body.model, result)

        @app.post("/v1/score", response_model=ScoreResponse, dependencies=auth, responses=ERRORS)
        async def score(body: ScoreBody) -> dict:
            self._check_score([body])
            result = await self._score(body)
            self._log("score", body.model_dump(), result)
            return result

        @app.post("/v1/score/batch", response_model=ScoreBatchResponse, dependencies=auth, responses=ERRORS)
        async def score_batch(body: ScoreBatchBody) -> dict:
            if len(body.items) > self.max_batch_items:
                raise _over("items", len(body.items), self.max_batch_items, "items", "too_many_items")
            self._check_score(body.items, batch=True)
            results = await asyncio.gather(
                *(self._score(item, f"items[{i}]: ") for i, item in enumerate(body.items)),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            return {"results": results}

        return app
