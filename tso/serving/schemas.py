"""Request and response models of the REST API (the handle-level requests are
``tso.engines.requests.GenerationRequest`` and ``tso.serving.judge.ScoreRequest``).

Every numeric field is bounded, so an out-of-range value is a 422, never a replica crash. Text
lengths are bounded here by a hard cap; the configurable limits (``serve.max_field_chars``,
``serve.max_batch_items``) are checked by the ingress, which knows them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tso.engines.requests import GenerationRequest, _Model
from tso.serving.judge import ScoreRequest

HARD_ITEMS_CAP = 4096


#: REST bodies are strict: JSON `false` is not the integer 0, nor "3" the number 3 (the OpenAPI says so)
STRICT = ConfigDict(strict=True)


class GenerateBody(GenerationRequest):
    """POST /v1/generate."""

    model_config = STRICT

    model: str = Field(min_length=1, max_length=128, description="a matrix model's name, or 'policy'")


class GenerateResponse(_Model):
    texts: list[str]
    model: str
    checkpoint: str
    finish_reasons: list[Literal["stop", "length"]]
    stop_tokens: list[str | None] = Field(description="the token that ended each sample (null: cut by length)")
    weight_version: int = Field(description="swaps of the deployment's weights before this answer (0: its first)")
    num_tokens: list[int]
    prompt_tokens: int
    seeds: list[int]


class ScoreBody(ScoreRequest):
    """POST /v1/score."""

    model_config = STRICT


class DimensionScore(_Model):
    dimension: str
    score: float | None
    evidence: str
    raw: str
    reason: str | None


class ScoreResponse(_Model):
    score: float | None = Field(description="2..10, or null when unscored (see reason)")
    evidence: str
    raw: str
    dimension: str = Field(description="the dimension scored, or 'mean' over all configured dimensions")
    checkpoint: str
    reason: str | None = Field(description="why unscored: no_score | out_of_range | other_scale | too_long (null when scored)")
    dimensions: list[DimensionScore] = Field(default_factory=list)


class ScoreBatchBody(_Model):
    """POST /v1/score/batch (at most serve.max_batch_items items)."""

    model_config = STRICT

    items: list[ScoreBody] = Field(min_length=1, max_length=HARD_ITEMS_CAP)


class ScoreBatchResponse(_Model):
    results: list[ScoreResponse]


class ModelInfo(_Model):
    name: str
    deployment: str
    role: str = Field(description="base | positive | negative | none (matrix models), policy, judge")
    version: int | None
    size: float | None
    checkpoint: str = Field(description="the model directory served now")
    weight_version: int = Field(0, description="swaps of the weights since the replica started")
    load_error: str | None = Field(None, description="the last swap that failed (the weights before it kept serving)")
    path: str = Field(description="the configured model directory")
    engine: str
    max_context: int
    base: str | None = None
    uncorrected: bool | None = Field(None, description="judge only: true while it serves the base model")
    dimensions: list[str] | None = None


# ----------------------------------------------------------------------------- errors


class FieldError(_Model):
    loc: list[str | int]
    msg: str
    type: str


class ErrorDetail(BaseModel):
    """What went wrong, as data: a code, a sentence, and the limit or the field when there is one."""

    model_config = ConfigDict(extra="allow")

    error: str
    message: str


class ErrorResponse(BaseModel):
    detail: ErrorDetail | list[FieldError] | str
