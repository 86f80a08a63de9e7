"""The toy world's verifier: a program that scores a response on the judge's 2..10 scale.

Two rubric dimensions, each on 2..10:

- **correctness** — the response's final answer (the *last* candidate of the family's answer type:
  the last integer, the last word, the last run of digits...) against the reference: 10 when
  right; 4 to 5.5 when wrong (partial credit by closeness: off-by-one numbers, near-miss words,
  the right digits in the wrong order); 2 when there is no answer at all (empty, garbage).
  ``spell`` is a format-following task, so the right letters without dashes count 5-6 there.
  Words of chatter ("The answer is", "Let me know if...") are skipped when looking for a word.
- **conciseness** — 10 for exactly the reference's form and nothing else; extra text costs
  ``8 * e / (e + 10)`` points (``e`` extra characters: 1 char -> -0.7, 15 -> -4.8); a format
  violation (wrong separator, wrong case) costs 2 more; no answer at all gives 2.

Overall (``verify``): ``2 + (c - 2) * (0.5 + 0.5 * (k - 2) / 8)`` — correctness scaled by
conciseness, so an exact concise answer is 10, the right answer buried in extra text about 7-8,
a wrong answer in the right format about 4, and garbage or empty 2.
"""

from __future__ import annotations

import re

from tso.method.judging import SCORE_MAX, SCORE_MIN

DIMENSIONS = ("correctness", "conciseness")

_INT = re.compile(r"-?\d+")
_WORD = re.compile(r"[A-Za-z]+")
_DIGIT_RUN = re.compile(r"\d(?:[ ,;/|-]*\d)*")
# Letters spelt apart ("p-l-a-n-k", "p l a n k") or, failing that, a whole word ("plank").
_SPELLED = re.compile(r"(?<![A-Za-z])[A-Za-z](?:[ \-,._/]+[A-Za-z](?![A-Za-z]))+|[A-Za-z]+")


def _clip(x: float) -> float:
    return round(min(SCORE_MAX, max(SCORE_MIN, x)), 2)


def _similarity(a: str, b: str) -> float:
    """1 - normalised Levenshtein distance."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def _wrong(closeness: float) -> float:
    """Correctness of a wrong answer that has the right type: 4 (far) to 5.5 (nearly right)."""
    return 4.0 + 1.5 * max(0.0, min(1.0, closeness))


# Each family: (candidate text, correctness, format_ok) or None when there is no answer.
Judged = tuple[str, float, bool]


def _judge_int(task: dict, text: str) -> Judged | None:
    found = _INT.findall(text)
    if not found:
        return None
    cand = found[-1]
    ans = int(task["answer"])
    value = int(cand)
    if value == ans:
        return cand, 10.0, True
    return cand, _wrong(1.0 - abs(value - ans) / max(3.0, 0.1 * abs(ans))), True  # off by 1: 5.0 (5.3 for 68)


# Words of chatter ("The answer is ...", "Let me know ...") are not answer candidates.
FILLER_WORDS = frozenset("""
a an the is are was it its this that here there answer answers final result so sure ok okay of to
for in on and or with as be i you me my your we let know if need anything else hope helps help
asked requested thanks thank glad sorry think not can will would just
reverse reversed word backwards capital city country spell spelled letters letter dashes
""".split())


def _judge_word(task: dict, text: str, capitalised: bool) -> Judged | None:
    ref = task["answer"].lower()
    found = [w for w in _WORD.findall(text) if w.lower() not in FILLER_WORDS or w.lower() == ref]
    if not found:
        return None
    cand = found[-1]
    ans = task["answer"]
    if cand == ans:
        return cand, 10.0, True
    if cand.lower() == ans.lower():
        return cand, 10.0, False  # right word, wrong case
    return cand, _wrong(_similarity(cand.lower(), ans.lower())), cand == (cand.capitalize() if capitalised else cand.lower())


def _judge_sort(task: dict, text: str) -> Judged | None:
    found = _DIGIT_RUN.findall(text)
    if not found:
        return None
    cand = found[-1]
    digits = re.findall(r"\d", cand)
    want = task["answer"].split(" ")
    fmt = cand == " ".join(digits)
    if digits == want:
        return cand, 10.0, fmt
    if sorted(digits) == want:
        return cand, 5.0, fmt  # the right digits, not sorted
    return cand, _wrong(_similarity("".join(digits), "".join(want))), fmt


def _judge_spell(task: dict, text: str) -> Judged | None:
    found = [m for m in _SPELLED.findall(text) if m.lower() not in FILLER_WORDS]
    if not found:
        return None
    cand = found[-1]
    letters = "".join(_WORD.findall(cand)).lower()
    want = task["answer"].replace("-", "")
    dashed = cand == "-".join(cand.replace("-", ""))
    if letters == want:
        if dashed and cand.islower():
            return cand, 10.0, True
        if len(cand) > 1 and not cand.isalpha():
            return cand, 6.0, False  # letters apart, other separators or case
        return cand, 5.0, False  # the bare word: the format was not followed
    return cand, _wrong(_similarity(letters, want)), dashed


def _judge(task: dict, text: str) -> Judged | None:
    family = task["family"]
    if family in ("add", "sub", "count"):
        return _judge_int(task, text)
    if family == "reverse":
        return _judge_word(task, text, capitalised=False)
    if family == "capital":
        return _judge_word(task, text, capitalised=True)
    if family == "sort":
        return _judge_sort(task, text)
    if family == "spell":
        return _judge_spell(task, text)
    raise ValueError(f"unknown task family {family!r}")


def verify_dimensions(task: dict, response: str) -> dict[str, float]:
    """Per-dimension scores on 2..10 (see the module docstring), plus nothing else."""
    text = (response or "").strip()
    if not text:
        return {"correctness": SCORE_MIN, "conciseness": SCORE_MIN}
    judged = _judge(task, text)
    if judged is None:
        return {"correctness": SCORE_MIN, "conciseness": SCORE_MIN}
    cand, correctness, format_ok = judged
    extra = max(0, len(text) - len(cand))
    conciseness = 10.0 - 8.0 * extra / (extra + 10) - (0.0 if format_ok else 2.0)
    return {"correctness": _clip(correctness), "conciseness": _clip(conciseness)}


def overall(dims: dict[str, float]) -> float:
    c, k = dims["correctness"], dims["conciseness"]
    return _clip(SCORE_MIN + (c - SCORE_MIN) * (0.5 + 0.5 * (k - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)))


def verify(task: dict, response: str) -> float:
    """The overall score of ``response`` to ``task`` on 2..10."""
    return overall(verify_dimensions(task, response))


def exact_match(task: dict, response: str) -> bool:
    return (response or "").strip() == task["answer"]


def evidence(task: dict, response: str, dimension: str) -> str:
    """A few words saying why a dimension scored what it did (the judge's short evidence text)."""
    text = (response or "").strip()
    if not text:
        return "empty answer."
    judged = _judge(task, text)
    if judged is None:
        return "no answer found."
    cand, correctness, format_ok = judged
    if dimension == "correctness":
        if correctness >= 10:
            return "correct."
        if correctness >= 5:
            return "close but wrong." if correctness < 6 or format_ok else "right content, wrong format."
        return "wrong answer."
    extra = max(0, len(text) - len(cand))
    parts = []
    if extra == 0:
        parts.append("concise")
    elif extra <= 3:
        parts.append("almost concise")
    else:
        parts.append("extra text")
    if not format_ok:
        parts.append("wrong format")
    return ", ".join(parts) + "."


def score_answer(prompt, response: str, metadata: dict) -> dict:
    """The toy world as an evaluation verifier (``eval.verifier: toyworld``): the overall score and the
    per-dimension scores of an answer to a prompt row (its task is parsed from prompt and metadata)."""
    from tso.toyworld.tasks import task_from_row

    dims = verify_dimensions(task_from_row({"prompt": prompt, **(metadata or {})}), response)
    return {"score": overall(dims), "dimensions": dims}
