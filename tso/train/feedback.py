"""Feedback examples for the judge's fine-tuning: JSONL records with ``messages``, the judge prompt as
user turn(s) and the verdict ("Evaluation evidence: ... Score: X.X") as the last assistant turn.
Malformed lines are rejected with their line number; nothing is truncated."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tso.train.data import encode_prompt, encode_response, prompt_text


@dataclass(frozen=True)
class SFTExample:
    id: str
    prompt: list[int]
    answer: list[int]  # answer tokens + EOS: the only tokens in the loss

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.answer)


@dataclass
class FeedbackReport:
    total: int = 0
    kept: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    too_long: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.kept}/{self.total} feedback examples kept"
        if self.malformed:
            s += f"; {len(self.malformed)} malformed lines rejected (first: line {self.malformed[0][0]}: {self.malformed[0][1]})"
        if self.too_long:
            s += f"; {len(self.too_long)} longer than max_length left out (ids: {', '.join(self.too_long[:5])})"
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "malformed": [list(m) for m in self.malformed],
                "too_long": self.too_long}


def split_messages(record: Any) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, answer): the last message must be the assistant's answer."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError("record has no 'messages' list")
    msgs = record["messages"]
    if len(msgs) < 2:
        raise ValueError("need at least a user turn and the assistant's answer")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message needs string 'role' and 'content'")
    if msgs[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"]


def read_feedback(path: str | Path, tokenizer, max_length: int, max_examples: int | None = None
                  ) -> tuple[list[SFTExample], FeedbackReport]:
    """Tokenize a feedback JSONL file; malformed lines are rejected with their line number and counted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feedback file")
    rep = FeedbackReport()
    out: list[SFTExample] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rep.total += 1
            try:
                record = json.loads(line)
                prompt_msgs, answer = split_messages(record)
                rid = str(record.get("id", f"line{n:07d}"))
                if rid in seen:
                    raise ValueError(f"duplicate id {rid!r}")
                text = prompt_text(tokenizer, prompt_msgs)
                prompt = encode_prompt(tokenizer, prompt_msgs)
            except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
                rep.malformed.append((n, str(e)))
                continue
            seen.add(rid)
            ans = encode_response(tokenizer, answer, after=(text, prompt))
            if len(prompt) + len(ans) > max_length:
                rep.too_long.append(rid)
                continue
            out.append(SFTExample(rid, prompt, ans))
    out.sort(key=lambda e: e.id)
    if max_examples is not None:
        out = out[:max_examples]
    rep.kept = len(out)
    return out, rep
