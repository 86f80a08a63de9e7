"""Generation requests as plain dicts: the handle-level format of the Serve deployments, also usable
in one process without Ray (``generate_requests``), so both paths parse and answer identically.

request: ``{"prompt": str | [{"role", "content"}], "n": 1, "temperature": None, "top_p": None,
"max_new_tokens": None, "seed": None}`` (None: the caller's defaults, a ``SamplingConfig``).
result: ``{"texts", "model", "checkpoint", "finish_reasons", "stop_tokens", "num_tokens", "prompt_tokens",
"seeds"}``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from tso.engines.base import (
    MAX_NEW_TOKENS_CAP,
    MAX_SAMPLES,
    SEED_MAX,
    EngineInputError,
    GenerationEngine,
    GenerationResult,
    SamplingParams,
)

#: Absolute caps (configurable limits, e.g. ``serve.max_field_chars``, are lower and checked by callers).
HARD_TEXT_CAP = 4_000_000
HARD_MESSAGES_CAP = 1024
#: Keys ``ray.data.llm``'s ServeDeploymentProcessor adds to each request dict; ignored.
PROCESSOR_KEYS = ("request_id", "idx_in_batch")


def _integral(value):
    """JSON Schema's integer includes 3.0: a float with no fraction is that integer (a bool stays a bool)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds):
    """An integer as JSON means it, also under strict validation (the REST bodies): 3 and 3.0, never
    true or "3". The bounds come first, so the OpenAPI states them as minimum/maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=HARD_TEXT_CAP)


Prompt = (
    Annotated[str, Field(min_length=1, max_length=HARD_TEXT_CAP)]
    | Annotated[list[ChatMessage], Field(min_length=1, max_length=HARD_MESSAGES_CAP)]
)
PROMPT_DESCRIPTION = "A string, or a chat: a list of {role, content} messages rendered with the model's chat template."


class GenerationRequest(_Model):
    """One generation request; a sampling field left out takes the caller's default."""

    prompt: Prompt = Field(description=PROMPT_DESCRIPTION)
    n: json_int(ge=1, le=MAX_SAMPLES) = Field(1, description="samples to draw")
    temperature: float | None = Field(None, ge=0, le=5, description="0 is greedy decoding")
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: json_int(ge=1, le=MAX_NEW_TOKENS_CAP) | None = None
    seed: json_int(ge=0, le=SEED_MAX) | None = Field(
        None,
        description="the same seed gives the same text whatever other requests share the batch",
    )

    def engine_prompt(self) -> str | list[dict]:
        return prompt_for_engine(self.prompt)

    def params(self, defaults=None, seed: int | None = None) -> SamplingParams:
        """SamplingParams with the gaps filled from ``defaults`` (a SamplingConfig) or SamplingParams'."""
        d = defaults or SamplingParams()
        return SamplingParams(
            n=self.n,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            max_new_tokens=d.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens,
            seed=self.seed if self.seed is not None else seed,
        )


def prompt_for_engine(prompt) -> str | list[dict]:
    return prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt]


def prompt_chars(prompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m.content) for m in prompt)


def parse_request(model: type[BaseModel], request) -> BaseModel:
    """A request dict validated into ``model``, or an EngineInputError naming the fields (a 422)."""
    if isinstance(request, BaseModel):
        request = request.model_dump()
    if not isinstance(request, dict):
        raise EngineInputError(f"a request is a dict, got {type(request).__name__}")
    request = {k: v for k, v in request.items() if k not in PROCESSOR_KEYS}
    try:
        return model.model_validate(request)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<request>'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise EngineInputError(f"invalid request: {problems}") from None


def result_dict(result: GenerationResult, model: str) -> dict:
    return {
        "texts": result.texts,
        "model": model,
        "checkpoint": result.checkpoint,
        "finish_reasons": result.finish_reasons,
        "stop_tokens": result.stop_tokens or [None] * len(result.texts),
        "weight_version": result.weight_version,
        "num_tokens": result.num_tokens,
        "prompt_tokens": result.prompt_tokens,
        "seeds": result.seeds,
    }


def error_dict(e: EngineInputError) -> dict:
    """A failed request in a list of results (``return_exceptions``): what went wrong, as data."""
    return {"error": {"code": getattr(e, "code", "invalid_request"), "message": e.message, **e.details}}


def generate_requests(engine: GenerationEngine, requests: list[dict], defaults=None, model: str = "",
                      return_exceptions: bool = False) -> list:
    """Answer request dicts in one batched engine call (no Ray). A bad request raises its
    EngineInputError, or with ``return_exceptions`` takes the exception's place in the output."""
    out: list = [None] * len(requests)
    ids, params, where = [], [], []
    for i, request in enumerate(requests):
        try:
            req = parse_request(GenerationRequest, request)
            ids.append(engine.encode(req.engine_prompt()))
            params.append(req.params(defaults))
            where.append(i)
        except EngineInputError as e:
            if not return_exceptions:
                raise
            out[i] = e
    for i, result in zip(where, engine.generate_ids(ids, params) if ids else []):
        out[i] = result_dict(result, model)
    return out
