"""The served OpenAPI states the limits exactly as the ingress enforces them.

The request models carry absolute caps (they also validate handle calls); the limits a deployment
enforces come from its config (``serve.*``) and from what it serves (model names, judge dimensions).
``state_limits`` writes those into the generated schema, so a client or a fuzzer reading
``/openapi.json`` knows every bound, length and enum before it sends anything.
"""

from __future__ import annotations

from typing import Any

from tso.engines.base import SEED_MAX

#: the request bodies of the API (component names; pydantic may add "-Input")
REQUEST_SCHEMAS = ("GenerateBody", "ScoreBody", "ScoreBatchBody", "ChatCompletionRequest", "CompletionRequest",
                   "ChatMessage")
TEXT_FIELDS = ("prompt", "response", "content")
TOKEN_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")


def _set(schema: dict, key: str, value: Any, kind: str) -> None:
    """Set ``key`` on the schema of type ``kind`` (itself, or the branch of an anyOf)."""
    if schema.get("type") == kind:
        schema[key] = value
    for branch in schema.get("anyOf", []):
        _set(branch, key, value, kind)


def _restrict(schema: dict, kind: str, enum: list[str]) -> None:
    if schema.get("type") == kind:
        for k in ("minLength", "maxLength"):
            schema.pop(k, None)
        schema["enum"] = list(enum)
    for branch in schema.get("anyOf", []):
        _restrict(branch, kind, enum)


def state_limits(openapi: dict, *, max_field_chars: int, max_batch_items: int, max_n: int, max_new_tokens: int,
                 models: list[str], dimensions: list[str] | None) -> dict:
    """The generated OpenAPI document with the deployment's limits written into its request schemas."""
    components = openapi.get("components", {}).get("schemas", {})
    for name, schema in components.items():
        if name.split("-")[0] not in REQUEST_SCHEMAS:
            continue
        props = schema.get("properties", {})
        for field, prop in props.items():
            if field in TEXT_FIELDS:
                _set(prop, "maxLength", max_field_chars, "string")
            elif field in TOKEN_FIELDS:
                _set(prop, "maximum", max_new_tokens, "integer")
            elif field == "n":
                _set(prop, "maximum", max_n, "integer")
            elif field == "seed":  # exact: pydantic writes 2**63 - 1 as a float, which rounds up to 2**63
                _set(prop, "maximum", SEED_MAX, "integer")
            elif field == "items":
                _set(prop, "maxItems", max_batch_items, "array")
            elif field == "model" and models:
                _restrict(prop, "string", models)
            elif field == "dimension" and dimensions:
                _restrict(prop, "string", dimensions)
    return openapi
