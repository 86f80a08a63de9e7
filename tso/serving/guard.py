"""The REST API's first line: what a request must be before any route, model or validator sees it.

An ASGI middleware, so a hostile request is answered here with a reason and never reaches code that
could fail on it with a 500:

- a Host header outside the allowed hosts is 400 (a DNS-rebinding page cannot talk to a local API);
- a body over ``max_bytes`` is 413, a body that arrives slower than ``body_timeout_s`` is 408;
- a JSON body must be strict JSON: ``NaN``/``Infinity`` and numbers that overflow to infinity
  (``1e400``), lone surrogates (``"\\ud800"``, not text), invalid UTF-8 and nesting deeper than
  ``max_depth`` are 422 in FastAPI's validation-error shape, naming where.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from tso.serving.auth import host_of

MAX_JSON_DEPTH = 64


class BadJSON(ValueError):
    def __init__(self, loc: list, msg: str, kind: str):
        super().__init__(msg)
        self.loc, self.msg, self.kind = loc, msg, kind


def _constant(name: str):
    raise BadJSON([], f"{name} is not a JSON number", "json_invalid")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJSON([], f"the number {text[:32]} is out of range", "json_invalid")
    return value


def parse_strict_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that accepts only what JSON allows and what a str can carry to the models."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadJSON([], f"the body is not UTF-8 (byte {e.start})", "json_invalid") from None
    try:
        data = json.loads(text, parse_constant=_constant, parse_float=_float)
    except RecursionError:
        raise BadJSON([], f"JSON nested deeper than {max_depth} levels", "json_too_deep") from None
    except json.JSONDecodeError as e:
        raise BadJSON([], f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", "json_invalid") from None
    check_tree(data, max_depth)
    return data


def check_tree(data: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Depth and text of a parsed JSON value, without recursion (the check must not be the thing that overflows)."""
    stack: list[tuple[Any, list, int]] = [(data, [], 0)]
    while stack:
        value, loc, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= max_depth:
                raise BadJSON(loc[:8], f"JSON nested deeper than {max_depth} levels", "json_too_deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, loc + [key])
                stack.append((item, loc + [key], depth + 1))
        elif isinstance(value, str):
            _check_text(value, loc)


def _check_text(text: str, loc: list) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadJSON([_printable(p) for p in loc], f"a lone surrogate at character {e.start} is not text",
                      "string_unicode") from None


def _printable(part):
    return part if isinstance(part, int) else part.encode("utf-8", "backslashreplace").decode("utf-8")


class RequestGuard:
    """ASGI middleware in front of the FastAPI app (see the module docstring)."""

    def __init__(self, app, *, max_bytes: int, body_timeout_s: float, allowed_hosts: list[str],
                 max_depth: int = MAX_JSON_DEPTH):
        self.app, self.max_bytes, self.body_timeout_s, self.max_depth = app, max_bytes, body_timeout_s, max_depth
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = set(allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if not self.any_host:
            host = host_of(headers.get(b"host", b"").decode("latin-1"))
            if host is None or host not in self.allowed_hosts:
                return await send_json(send, 400, {"detail": {
                    "error": "host_not_allowed",
                    "message": "the Host header names no host this API serves (serve.allowed_hosts)"}})
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await send_json(send, 400, {"detail": {"error": "bad_content_length",
                                                              "message": "invalid Content-Length header"}})
            if size > self.max_bytes:
                return await send_json(send, 413, too_large(size, self.max_bytes))
        try:
            body = await asyncio.wait_for(self._read(receive), self.body_timeout_s)
        except asyncio.TimeoutError:
            return await send_json(send, 408, {"detail": {
                "error": "body_timeout", "limit_s": self.body_timeout_s,
                "message": f"the request body did not arrive within {self.body_timeout_s:g} s"}})
        if body is None:  # the client went away
            return
        if isinstance(body, int):
            return await send_json(send, 413, too_large(body, self.max_bytes, at_least=True))
        if body.strip() and _is_json(headers.get(b"content-type")):
            try:
                parse_strict_json(body, self.max_depth)
            except BadJSON as e:
                return await send_json(send, 422, {"detail": [{"loc": ["body", *e.loc], "msg": e.msg, "type": e.kind}]})
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replay_receive, send)

    async def _read(self, receive) -> bytes | int | None:
        """The body (at most max_bytes of it: over that, the size seen so far), or None on disconnect."""
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return total
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _is_json(content_type: bytes | None) -> bool:
    """FastAPI reads a body as JSON when no content type is given or it is a JSON one."""
    if not content_type:
        return True
    kind = content_type.split(b";")[0].strip().lower()
    return kind == b"application/json" or kind.endswith(b"+json")


def too_large(size: int, limit: int, at_least: bool = False) -> dict:
    return {"detail": {"error": "body_too_large", "limit_bytes": limit,
                       "message": f"request body is {'over ' if at_least else ''}{size} bytes; the limit is {limit}"}}


async def send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload, ensure_ascii=True).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
