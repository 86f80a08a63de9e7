"""OpenAI-compatible shapes of the REST API, so any OpenAI client or evaluation harness can talk to a
TSO policy or a matrix model: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.

Requests map onto tso's own generation request (``tso.engines.requests.GenerationRequest``): the
OpenAI names (``max_tokens``, ``temperature``, ``top_p``, ``n``, ``seed``) with tso's bounds. What
tso does not do is an error, never a silent change: ``stream``, ``logprobs``, ``tools``, ``stop``
strings and penalties other than 0 are 422s naming the field. Other OpenAI keys are accepted and
ignored. Answers are OpenAI's objects plus a ``tso`` entry (checkpoint, weight version, seeds).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tso.engines.base import MAX_NEW_TOKENS_CAP, MAX_SAMPLES, SEED_MAX
from tso.engines.requests import HARD_TEXT_CAP, ChatMessage, json_int

#: OpenAI request keys tso cannot honour: (value that means "off", why)
UNSUPPORTED = {
    "stream": (False, "streaming is not supported: send stream=false"),
    "logprobs": (False, "log-probabilities are not returned"),
    "top_logprobs": (None, "log-probabilities are not returned"),
    "tools": (None, "tool calls are not supported"),
    "tool_choice": (None, "tool calls are not supported"),
    "stop": (None, "stop strings are not supported (a model stops at its own stop tokens)"),
    "presence_penalty": (0, "penalties are not supported"),
    "frequency_penalty": (0, "penalties are not supported"),
    "logit_bias": (None, "logit_bias is not supported"),
    "response_format": (None, "response_format is not supported"),
}


def _is_off(value, off) -> bool:
    """None, or the off value with its JSON type (``false`` is not the number 0, nor 0 false)."""
    if value is None:
        return True
    if isinstance(off, bool) or isinstance(value, bool):
        return value is off
    return isinstance(value, (int, float)) and value == off


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # as tso's own bodies (tso.serving.schemas)

    model: str = Field(min_length=1, max_length=128, description="a matrix model's name, or 'policy'")
    max_tokens: json_int(ge=1, le=MAX_NEW_TOKENS_CAP) | None = None
    max_completion_tokens: json_int(ge=1, le=MAX_NEW_TOKENS_CAP) | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: json_int(ge=1, le=MAX_SAMPLES) = 1
    seed: json_int(ge=0, le=SEED_MAX) | None = None
    # OpenAI keys tso cannot honour: in the schema with the one value they may take ("off")
    stream: Literal[False] | None = Field(None, description=UNSUPPORTED["stream"][1])
    logprobs: Literal[False] | None = Field(None, description=UNSUPPORTED["logprobs"][1])
    top_logprobs: None = Field(None, description=UNSUPPORTED["top_logprobs"][1])
    tools: None = Field(None, description=UNSUPPORTED["tools"][1])
    tool_choice: None = Field(None, description=UNSUPPORTED["tool_choice"][1])
    stop: None = Field(None, description=UNSUPPORTED["stop"][1])
    presence_penalty: float | None = Field(None, ge=0, le=0, description=UNSUPPORTED["presence_penalty"][1])
    frequency_penalty: float | None = Field(None, ge=0, le=0, description=UNSUPPORTED["frequency_penalty"][1])
    logit_bias: None = Field(None, description=UNSUPPORTED["logit_bias"][1])
    response_format: None = Field(None, description=UNSUPPORTED["response_format"][1])

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, data):
        """Say why (the field's own error would only say which value it wants)."""
        if isinstance(data, dict):
            for key, (off, why) in UNSUPPORTED.items():
                if not _is_off(data.get(key), off):
                    raise ValueError(f"{key}: {why}")
        return data

    def generation_request(self, prompt) -> dict:
        """tso's generation request (model left out): the handle-level format of the deployments."""
        return {"prompt": prompt, "n": self.n, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_completion_tokens or self.max_tokens, "seed": self.seed}


class ChatCompletionRequest(_OpenAIRequest):
    """POST /v1/chat/completions: the chat goes through the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)


class CompletionRequest(_OpenAIRequest):
    """POST /v1/completions: the prompt is raw text the model continues (no chat template)."""

    prompt: str = Field(min_length=1, max_length=HARD_TEXT_CAP)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class TsoDetails(BaseModel):
    checkpoint: str
    weight_version: int
    seeds: list[int]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    tso: TsoDetails


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    tso: TsoDetails


class OpenAIModel(BaseModel):
    """One entry of /v1/models: OpenAI's fields, then tso's (name, role, version, checkpoint, ...)."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tso"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


def _common(model: str, result: dict, prefix: str) -> dict[str, Any]:
    completion = sum(result["num_tokens"])
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": model,
        "usage": {"prompt_tokens": result["prompt_tokens"], "completion_tokens": completion,
                  "total_tokens": result["prompt_tokens"] + completion},
        "tso": {"checkpoint": result["checkpoint"], "weight_version": result.get("weight_version", 0),
                "seeds": result["seeds"]},
    }


def chat_completion(model: str, result: dict) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
               for i, (text, reason) in enumerate(zip(result["texts"], result["finish_reasons"]))]
    return {**_common(model, result, "chatcmpl"), "object": "chat.completion", "choices": choices}


def completion(model: str, result: dict) -> dict:
    choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
               for i, (text, reason) in enumerate(zip(result["texts"], result["finish_reasons"]))]
    return {**_common(model, result, "cmpl"), "object": "text_completion", "choices": choices}


def model_list(infos: list[dict], created: int) -> dict:
    """tso's model infos as OpenAI's model list: each entry keeps every tso field."""
    return {"object": "list", "data": [{"id": i["name"], "object": "model", "created": created, "owned_by": "tso", **i}
                                       for i in infos]}
