"""The judge's rubric prompt and score extraction (paper appendix D.2, eq. 7-8).

The rubric prompt ends with the answer format, so a judge that was never fine-tuned on it (a real
instruct model used as is) knows what to write. S(.) takes the *last* score marker: ``Score: 8``,
and the variants real judges write (``**Score:** 8``, ``Score: **8**``, a full-width colon,
``Score: 8/10``). A missing number, one outside [2, 10] or on another scale (``4/5``) is *unscored*
with its reason, never a default number.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

SCORE_MIN, SCORE_MAX = 2.0, 10.0
AnswerFormat = Literal["evidence_first", "score_only"]

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
# "Score", optional markdown emphasis, an ASCII or full-width colon, emphasis again, the number, "/10"
_SCORE = re.compile(rf"score\s*[*_]*\s*[:：]\s*[*_]*\s*({_NUMBER})(?:\s*/\s*({_NUMBER}))?", re.IGNORECASE)
_EVIDENCE = re.compile(r"evaluation evidence\s*[*_]*\s*[:：]\s*(.*?)\s*(?:[*_]*\s*score\s*[*_]*\s*[:：]|$)",
                       re.IGNORECASE | re.DOTALL)

FORMAT_INSTRUCTIONS: dict[str, str] = {
    "evidence_first": 'Reply as "Evaluation evidence: <why> Score: <2-10>".',
    "score_only": 'Reply as "Score: <2-10>".',
}

#: why a judge answer is unscored
UNSCORED_REASONS = ("no_score", "out_of_range", "other_scale", "too_long")


@dataclass(frozen=True)
class JudgeVerdict:
    score: float | None  # None means unscored
    evidence: str
    raw: str
    reason: str | None = None  # why unscored: one of UNSCORED_REASONS

    @property
    def scored(self) -> bool:
        return self.score is not None


def judge_question(prompt: str | list[dict]) -> str:
    """The question a judge sees: a string as is; a chat as its one user turn or as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def render_judge_prompt(rubric: str, question: str, answer: str, answer_format: AnswerFormat = "evidence_first") -> str:
    """The user turn of a judge conversation: rubric, question, answer, then the answer format."""
    return (
        f"{rubric} Score from {SCORE_MIN:g} to {SCORE_MAX:g}.\n"
        f"[User Question]\n{question}\n"
        f"[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]\n"
        f"{FORMAT_INSTRUCTIONS[answer_format]}"
    )


def format_judge_answer(evidence: str, score: float, answer_format: AnswerFormat = "evidence_first") -> str:
    """The target text of a feedback example."""
    if answer_format == "score_only":
        return f"Score: {score:.1f}"
    return f"Evaluation evidence: {evidence} Score: {score:.1f}"


def _evidence(text: str, last_marker: re.Match | None) -> str:
    ev = _EVIDENCE.search(text)
    if ev:
        return ev.group(1).strip().strip("*_ ").strip()
    return (text[: last_marker.start()] if last_marker else text).strip()


def extract_score(text: str) -> JudgeVerdict:
    markers = list(_SCORE.finditer(text))
    last = markers[-1] if markers else None
    evidence = _evidence(text, last)
    if last is None:
        return JudgeVerdict(None, evidence, text, "no_score")
    value = float(last.group(1))
    scale = last.group(2)
    if scale is not None and float(scale) != SCORE_MAX:
        return JudgeVerdict(None, evidence, text, "other_scale")
    if not math.isfinite(value) or not (SCORE_MIN <= value <= SCORE_MAX):
        return JudgeVerdict(None, evidence, text, "out_of_range")
    return JudgeVerdict(value, evidence, text, None)


def too_long_verdict() -> JudgeVerdict:
    """A judge prompt that does not fit the judge's context (with room for its answer): never truncated."""
    return JudgeVerdict(None, "", "", "too_long")


def mean_score(verdicts: list[JudgeVerdict]) -> float | None:
    """A response's score over several dimensions: the mean of the scored ones (None if none scored)."""
    scores = [v.score for v in verdicts if v.score is not None]
    return sum(scores) / len(scores) if scores else None
