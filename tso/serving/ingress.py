"""The REST API: a FastAPI app on a Serve ingress deployment, in front of the model deployments.

Endpoints (OpenAPI docs at ``/docs``)::

    POST /v1/score         {"prompt", "response", "dimension"?}   -> ScoreResponse
    POST /v1/score/batch   {"items": [...]} (<= serve.max_batch_items) -> {"results": [...]}
    POST /v1/generate      {"model", "prompt", "n", "temperature", "top_p", "max_new_tokens", "seed"}
    POST /v1/chat/completions, /v1/completions   OpenAI's shapes (tso.serving.openai_api)
    GET  /v1/models        OpenAI's model list; each entry with tso's name, version, size, role, checkpoint
    GET  /healthz          liveness (no auth)

Errors are answers, never crashes: a body over ``serve.max_body_bytes``, a text field over
``serve.max_field_chars``, more items than ``serve.max_batch_items`` and a prompt longer than the
model's context are 413 with the limit; malformed JSON, unknown keys and out-of-range numbers are 422;
an unknown model is 404; a missing or wrong bearer token is 401 when the environment variable named by
``serve.auth_token_env`` was set when the app was built (the API is open when it was not).
"""

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from ray import serve

from tso.engines.base import EngineInputError
from tso.engines.requests import prompt_chars
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
from tso.serving.schemas import (
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
    401: {"description": "missing or wrong bearer token"},
    404: {"description": "unknown model"},
    413: {"description": "body, field, batch or prompt over its limit (the limit is in the answer)"},
    422: {"description": "malformed request or a value out of range"},
}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before any parsing."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _send_json(send, 400, {"detail": "invalid Content-Length header"})
            if size > self.max_bytes:
                return await _send_json(send, 413, _too_large(size, self.max_bytes))
        chunks, total, more = [], 0, True
        while more:  # read (at most max_bytes of) the body here, then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await _send_json(send, 413, _too_large(total, self.max_bytes, at_least=True))
            chunks.append(body)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replay_receive, send)


def _too_large(size: int, limit: int, at_least: bool = False) -> dict:
    return {"detail": {"error": "body_too_large", "limit_bytes": limit,
                       "message": f"request body is {'over ' if at_least else ''}{size} bytes; the limit is {limit}"}}


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _input_error(e: EngineInputError, where: str = "") -> HTTPException:
    detail: dict[str, Any] = {"error": getattr(e, "code", "invalid_request"), "message": where + e.message}
    detail.update(e.details)
    return HTTPException(status_code=getattr(e, "status", 422), detail=detail)


def _field_limit(name: str, length: int, limit: int) -> HTTPException:
    return HTTPException(413, detail={
        "error": "field_too_long", "field": name, "length": length, "limit": limit,
        "message": f"{name} is {length} characters; the limit is {limit}",
    })


@serve.ingress()
class Ingress:
    """Routes REST requests to the deployments through their handles."""

    def __init__(self, *, models: dict, policy, judge, limits: dict, token_sha256: str | None,
                 title: str = "tso", base: str | None = None):
        self.models = dict(models)  # matrix name -> handle of model-<name>
        self.policy, self.judge = policy, judge
        self.base = base  # the matrix name the policy deployment serves (it has no deployment of its own)
        self.created = int(time.time())
        self.max_body_bytes = int(limits["max_body_bytes"])
        self.max_field_chars = int(limits["max_field_chars"])
        self.max_batch_items = int(limits["max_batch_items"])
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
        raise HTTPException(404, detail={"error": "unknown_model", "model": model,
                                         "message": f"no model {model!r}", "models": self._served()})

    def _check_score_fields(self, body: ScoreBody, where: str = "") -> None:
        for name, length in (("prompt", prompt_chars(body.prompt)), ("response", len(body.response))):
            if length > self.max_field_chars:
                raise _field_limit(where + name, length, self.max_field_chars)

    async def _score(self, body: ScoreBody, where: str = "") -> dict:
        if self.judge is None:
            raise HTTPException(404, detail={"error": "no_judge", "message": "this app serves no judge"})
        try:
            return await self.judge.score.remote(body.model_dump())
        except EngineInputError as e:
            raise _input_error(e, where) from None

    # -- the app

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(
            title=f"{self.title}: TSO model matrix and judge",
            description=(__doc__ or "").split("\n\n")[0],
            version="1",
        )
        app.add_middleware(BodySizeLimit, max_bytes=self.max_body_bytes)

        async def authorize(authorization: str | None = Header(None, description="Bearer <token>")):
            if self.token_sha256 is None:
                return
            scheme, _, token = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise HTTPException(401, detail="a bearer token is required (Authorization: Bearer <token>)",
                                    headers={"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(token_digest(token.strip()), self.token_sha256):
                raise HTTPException(401, detail="wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

        auth = [Depends(authorize)]

        @app.exception_handler(EngineInputError)
        async def _engine_input(_: Request, e: EngineInputError):  # any that escaped a route
            err = _input_error(e)
            return JSONResponse(status_code=err.status_code, content={"detail": err.detail})

        @app.get("/healthz")
        async def healthz() -> dict:
            return {"status": "ok"}

        @app.get("/v1/models", response_model=ModelList, dependencies=auth, responses=_ERRORS)
        async def models() -> dict:
            """OpenAI's model list; each entry also holds tso's fields (role, version, checkpoint, ...)."""
            handles = [h for h in (*self.models.values(), self.policy, self.judge) if h is not None]
            infos = await asyncio.gather(*(h.info.remote() for h in handles))
            return model_list([{k: v for k, v in i.items() if k in ModelInfo.model_fields} for i in infos], self.created)

        async def _generate(model: str, request: dict, chars: int) -> dict:
            handle = self._handle(model)
            if chars > self.max_field_chars:
                raise _field_limit("prompt", chars, self.max_field_chars)
            try:
                return await handle.generate.remote(request)
            except EngineInputError as e:
                raise _input_error(e) from None

        @app.post("/v1/generate", response_model=GenerateResponse, dependencies=auth, responses=_ERRORS)
        async def generate(body: GenerateBody) -> dict:
            return await _generate(body.model, body.model_dump(exclude={"model"}), prompt_chars(body.prompt))

        @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=auth, responses=_ERRORS)
        async def chat_completions(body: ChatCompletionRequest) -> dict:
            """OpenAI's chat completion: the messages through the model's chat template."""
            result = await _generate(body.model, body.generation_request([m.model_dump() for m in body.messages]),
                                     prompt_chars(body.messages))
            return chat_completion(body.model, result)

        @app.post("/v1/completions", response_model=Completion, dependencies=auth, responses=_ERRORS)
        async def completions(body: CompletionRequest) -> dict:
            """OpenAI's (legacy) completion: the prompt is raw text the model continues."""
            result = await _generate(body.model, body.generation_request(body.prompt), len(body.prompt))
            return completion(body.model, result)

        @app.post("/v1/score", response_model=ScoreResponse, dependencies=auth, responses=_ERRORS)
        async def score(body: ScoreBody) -> dict:
            self._check_score_fields(body)
            return await self._score(body)

        @app.post("/v1/score/batch", response_model=ScoreBatchResponse, dependencies=auth, responses=_ERRORS)
        async def score_batch(body: ScoreBatchBody) -> dict:
            if len(body.items) > self.max_batch_items:
                raise HTTPException(413, detail={
                    "error": "too_many_items", "items": len(body.items), "limit": self.max_batch_items,
                    "message": f"{len(body.items)} items; the limit is {self.max_batch_items}"})
            for i, item in enumerate(body.items):
                self._check_score_fields(item, f"items[{i}].")
            results = await asyncio.gather(
                *(self._score(item, f"items[{i}]: ") for i, item in enumerate(body.items)),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            return {"results": results}

        return app
