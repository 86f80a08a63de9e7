"""The judge's rubric prompt and score extraction (TSO-METHOD.md section 2).

A judge answers "Evaluation evidence: <text> Score: <s>". S(.) takes the last "Score: <number>";
a missing number or one outside [2, 10] is *unscored* with its reason, never a default number.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SCORE_MIN, SCORE_MAX = 2.0, 10.0
_SCORE = re.compile(r"Score:\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)
_EVIDENCE = re.compile(r"Evaluation evidence:\s*(.*?)\s*(?:Score:|$)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class JudgeVerdict:
    score: float | None  # None means unscored
    evidence: str
    raw: str
    reason: str | None = None  # why unscored: "no_score", "out_of_range"

    @property
    def scored(self) -> bool:
        return self.score is not None


def render_judge_prompt(rubric: str, question: str, answer: str) -> str:
    """The user turn of a judge conversation (paper appendix D.2 layout, the rubric text is a setting)."""
    return (
        f"{rubric} Score from {SCORE_MIN:g} to {SCORE_MAX:g}.\n"
        f"[User Question]\n{question}\n"
        f"[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
    )


def format_judge_answer(evidence: str, score: float) -> str:
    """The target text of a feedback example."""
    return f"Evaluation evidence: {evidence} Score: {score:.1f}"


def extract_score(text: str) -> JudgeVerdict:
    matches = _SCORE.findall(text)
    ev = _EVIDENCE.search(text)
    evidence = ev.group(1).strip() if ev else text.rsplit("Score:", 1)[0].strip()
    if not matches:
        return JudgeVerdict(None, evidence, text, "no_score")
    value = float(matches[-1])
    if not math.isfinite(value) or not (SCORE_MIN <= value <= SCORE_MAX):
        return JudgeVerdict(None, evidence, text, "out_of_range")
    return JudgeVerdict(value, evidence, text, None)


def mean_score(verdicts: list[JudgeVerdict]) -> float | None:
    """A response's score over several dimensions: the mean of the scored ones (None if none scored)."""
    scores = [v.score for v in verdicts if v.score is not None]
    return sum(scores) / len(scores) if scores else None
