"""Reading a prompts dataset (JSONL or Parquet) with every bad row rejected by line and reason.

A row: {"prompt": str | [{"role", "content"}, ...], "human": optional str, "id": optional str|int,
"metadata": optional object}. "human_response" is accepted as an alias of "human"; any other field
(e.g. the toy world's "family") is kept in the row's metadata. A null human answer (or NaN, as a
column without any answer can come out of a dataframe) is no human answer. Nothing is silently
dropped: each rejected row goes to the rejects file with its line (JSONL, 1-based) or row number
(Parquet, 1-based) and the reason, and is counted in the summary. A line that is not valid UTF-8, or
text holding a lone surrogate (``"\ud800"`` in JSON), is a reject: no tokenizer or JSON writer
downstream could take it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROLES = {"system", "user", "assistant"}


@dataclass
class PromptSet:
    rows: list[dict]
    rejects: list[dict] = field(default_factory=list)
    over_limit: int = 0  # valid rows past pairs.max_prompts (counted, not used)

    @property
    def reject_counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejects))


def prompt_text(prompt) -> str:
    """A flat text of a prompt (for size limits and for display)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


def as_chat(prompt) -> list[dict]:
    """Prompts are instructions: a plain string is one user turn, so every engine renders it with the
    model's chat template, as training does (never as raw text to continue)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _check_prompt(prompt) -> str | None:
    if prompt is None:
        return "missing_prompt"
    if isinstance(prompt, str):
        return "empty_prompt" if not prompt.strip() else None
    if isinstance(prompt, list):
        if not prompt:
            return "empty_prompt"
        for m in prompt:
            if not isinstance(m, dict) or set(m) - {"role", "content"} or not isinstance(m.get("content"), str):
                return "bad_chat_message"
            if m.get("role") not in ROLES:
                return "bad_chat_role"
        if prompt[-1]["role"] != "user":
            return "chat_must_end_with_user"
        if not any(m["content"].strip() for m in prompt):
            return "empty_prompt"
        return None
    return "bad_prompt_type"


def _lone_surrogate(value) -> str | None:
    """The first string holding a lone surrogate (not encodable as UTF-8), if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"lone surrogate U+{ord(value[e.start]):04X} at character {e.start}"
        return None
    if isinstance(value, dict):
        value = list(value.keys()) + list(value.values())
    if isinstance(value, list):
        return next((p for p in map(_lone_surrogate, value) if p), None)
    return None


def _no_answer(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def reject_record(number: int, reason: str, detail: str = "", raw="", **extra) -> dict:
    shown = raw if isinstance(raw, str) else json.dumps(raw, default=str, ensure_ascii=True)
    return {"line": number, "reason": reason, "detail": detail, "raw": shown[:2000], **extra}


def validate_row(raw, number: int, max_chars: int, seen_ids: set[str]) -> tuple[dict | None, dict | None]:
    """(row, None) for a good row, (None, reject) for a bad one."""

    def reject(reason: str, detail: str = "") -> tuple[None, dict]:
        return None, reject_record(number, reason, detail, raw)

    if not isinstance(raw, dict):
        return reject("not_an_object", f"got {type(raw).__name__}")
    bad_text = _lone_surrogate(raw)
    if bad_text:
        return reject("invalid_unicode", bad_text)
    human = raw.get("human", raw.get("human_response"))
    if _no_answer(human):
        human = None
    problem = _check_prompt(raw.get("prompt"))
    if problem:
        return reject(problem)
    size = len(prompt_text(raw["prompt"]))
    if size > max_chars:
        return reject("prompt_too_long", f"{size} characters > limit {max_chars}")
    if human is not None and (not isinstance(human, str) or not human.strip()):
        return reject("bad_human_response", "must be a non-empty string")
    rid = raw.get("id", f"row-{number}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return reject("bad_id", f"id must be a string or integer, got {type(rid).__name__}")
    rid = str(rid)
    if rid in seen_ids:
        return reject("duplicate_id", f"id {rid!r} already seen")
    meta = raw.get("metadata", {})
    if not isinstance(meta, dict):
        return reject("bad_metadata", "metadata must be an object")
    extra = {k: v for k, v in raw.items() if k not in ("prompt", "human", "human_response", "id", "metadata")}
    meta = {**extra, **meta}
    seen_ids.add(rid)
    return {"id": rid, "prompt": raw["prompt"], "human": human, "metadata": meta, "line": number}, None


def _raw_rows(path: Path):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, {k: v for k, v in row.items() if v is not None}
        return
    with path.open("rb") as f:
        for i, data in enumerate(f, start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, _BadBytes(data.decode("utf-8", errors="replace").rstrip("\n"),
                                   f"byte 0x{data[e.start]:02x} at offset {e.start} is not valid UTF-8")
                continue
            if not line.strip():
                yield i, _BlankLine()
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, _BadJson(line.rstrip("\n"), str(e))


class _BadJson(str):
    def __new__(cls, text: str, error: str):
        obj = super().__new__(cls, text)
        obj.error = error
        return obj


class _BadBytes(_BadJson):
    pass


class _BlankLine(str):
    pass


def read_prompts(path: str | Path, max_chars: int = 8192, max_prompts: int | None = None) -> PromptSet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    out = PromptSet(rows=[])
    seen: set[str] = set()
    for number, raw in _raw_rows(path):
        if isinstance(raw, _BlankLine):
            out.rejects.append(reject_record(number, "blank_line"))
            continue
        if isinstance(raw, _BadJson):
            reason = "invalid_utf8" if isinstance(raw, _BadBytes) else "invalid_json"
            out.rejects.append(reject_record(number, reason, raw.error, str(raw)))
            continue
        row, rej = validate_row(raw, number, max_chars, seen)
        if rej:
            out.rejects.append(rej)
        elif max_prompts is None or len(out.rows) < max_prompts:
            out.rows.append(row)
        else:
            out.over_limit += 1
    return out


def write_rejects(rejects: list[dict], path: str | Path) -> None:
    from tso.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects))
