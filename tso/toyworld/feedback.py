"""Feedback data for evaluation correction (docs/method.md section 2): scored judge examples.

Each example is one (task, answer, rubric dimension): the user turn is
``render_judge_prompt(rubric, question, answer)`` and the target is
``format_judge_answer(evidence, score)``, e.g. "Evaluation evidence: correct. Score: 9.0" (short,
for tiny judges). Answers come in many qualities — correct, wrong, near misses, verbose, truncated,
format violations, garbage, empty, and (when given) real answers of the matrix's models.

Scores come from the verifier: "human" feedback is the verifier's dimension score rounded to 0.5;
"ai" feedback adds Gaussian noise (``ai_noise``) and rounds to ``ai_round``, clipped to 2..10 —
an imperfect AI judge. Every record keeps the exact verifier score beside the recorded one.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from tso.config import DEFAULT_RUBRICS
from tso.method.judging import SCORE_MAX, SCORE_MIN, format_judge_answer, render_judge_prompt
from tso.toyworld.tasks import FACTS, read_jsonl, write_jsonl
from tso.toyworld.verifier import DIMENSIONS, evidence, verify, verify_dimensions

# Answer kinds and how often each is drawn (model answers, when given, take MODEL_SHARE).
KIND_WEIGHTS = {
    "correct": 0.18, "verbose": 0.12, "wrong": 0.14, "near_miss": 0.10, "verbose_wrong": 0.07,
    "truncated": 0.10, "format": 0.12, "garbage": 0.08, "empty": 0.03, "repeated": 0.06,
}
MODEL_SHARE = 0.3
RECORD_FIELDS = ("id", "task_id", "family", "dimension", "source", "kind", "question", "answer", "score",
                 "verifier_score", "messages")

_WRAPPERS = (
    "The answer is {a}.",
    "Sure! {a}",
    "Answer: {a}",
    "I think it is {a}.",
    "Sure! Here is the answer you asked for: {a}. Let me know if you need anything else!",
    "Let me think. The final answer is {a}. Hope this helps!",
)
_GARBAGE = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?-+*/#%&()[]{}<>"


def _round(x: float, step: float) -> float:
    return min(SCORE_MAX, max(SCORE_MIN, round(x / step) * step))


def _mutate_word(w: str, rng: random.Random) -> str:
    if len(w) < 2:
        return w + rng.choice("abcdefghijklmnopqrstuvwxyz")
    chars = list(w)
    i = rng.randrange(len(chars))
    if rng.random() < 0.5:
        j = (i + 1) % len(chars)
        chars[i], chars[j] = chars[j], chars[i]
    choices = [c for c in "abcdefghijklmnopqrstuvwxyz" if c != chars[i].lower()]
    if "".join(chars) == w:
        chars[i] = rng.choice(choices)
    out = "".join(chars)
    return out if w[:1].islower() else out.capitalize()


def wrong_answer(task: dict, rng: random.Random, near: bool = False) -> str:
    """A wrong answer in the right format (``near``: a near miss)."""
    fam, ans = task["family"], task["answer"]
    if fam in ("add", "sub", "count"):
        v = int(ans)
        delta = rng.choice([-1, 1]) if near else rng.choice([-1, 1]) * rng.randint(2, 30)
        return str(max(0, v + delta) if max(0, v + delta) != v else v + 1)
    if fam == "reverse":
        word = task["args"]["w"]  # not reversed: a classic mistake
        return word if not near and rng.random() < 0.5 and word != ans else _mutate_word(ans, rng)
    if fam == "capital":
        if near:
            return _mutate_word(ans, rng)
        return rng.choice([c for c in FACTS.values() if c != ans])
    if fam == "sort":
        digits = ans.split(" ")
        if near and len(digits) > 1:
            i = rng.randrange(len(digits) - 1)
            digits[i], digits[i + 1] = digits[i + 1], digits[i]
            if digits == ans.split(" "):
                digits[i] = str((int(digits[i]) + 1) % 10)
        else:
            digits = [str(rng.randint(0, 9)) for _ in digits]
            if digits == ans.split(" "):
                digits[0] = str((int(digits[0]) + 1) % 10)
        return " ".join(digits)
    if fam == "spell":
        return "-".join(_mutate_word(ans.replace("-", ""), rng))
    raise ValueError(f"unknown task family {fam!r}")


def format_violation(task: dict, rng: random.Random) -> str:
    fam, ans = task["family"], task["answer"]
    if fam in ("add", "sub", "count"):
        return rng.choice([f"= {ans}", f"{ans}!", f"({ans})"])
    if fam == "reverse":
        return ans.upper()
    if fam == "capital":
        return rng.choice([ans.lower(), ans.upper()])
    if fam == "sort":
        return rng.choice([ans.replace(" ", ","), ans.replace(" ", ""), ans.replace(" ", "-")])
    if fam == "spell":
        return rng.choice([ans.replace("-", " "), ans.replace("-", ""), ans.upper(), ans.replace("-", ", ")])
    raise ValueError(f"unknown task family {fam!r}")


def synth_answer(task: dict, kind: str, rng: random.Random) -> str:
    ans = task["answer"]
    if kind == "correct":
        return ans
    if kind == "verbose":
        return rng.choice(_WRAPPERS).format(a=ans)
    if kind == "wrong":
        return wrong_answer(task, rng)
    if kind == "near_miss":
        return wrong_answer(task, rng, near=True)
    if kind == "verbose_wrong":
        return rng.choice(_WRAPPERS).format(a=wrong_answer(task, rng))
    if kind == "truncated":
        return ans[: rng.randrange(1, len(ans))] if len(ans) > 1 else ""
    if kind == "format":
        return format_violation(task, rng)
    if kind == "garbage":
        return "".join(rng.choice(_GARBAGE) for _ in range(rng.randint(2, 16))).strip() or "?"
    if kind == "empty":
        return ""
    if kind == "repeated":
        return " ".join([ans] * rng.randint(2, 4))
    raise ValueError(f"unknown answer kind {kind!r}")


def feedback_records(
    tasks: Iterable[dict],
    seed: int = 0,
    dimensions: Iterable[str] = DIMENSIONS,
    rubrics: dict[str, str] | None = None,
    answers_per_task: int = 2,
    ai_fraction: float = 0.5,
    ai_noise: float = 1.0,
    ai_round: float = 1.0,
    human_round: float = 0.5,
    model_answers: dict[str, list[tuple[str, str]]] | None = None,
) -> list[dict]:
    """Scored judge examples for ``tasks``: ``answers_per_task`` answers each, one record per dimension.

    ``model_answers`` maps a task id to [(model name, response)], the answers of real models.
    Deterministic given ``seed`` (each task draws from its own generator).
    """
    rubrics = {**DEFAULT_RUBRICS, **(rubrics or {})}
    dimensions = list(dimensions)
    missing = [d for d in dimensions if d not in rubrics]
    if missing:
        raise ValueError(f"dimensions {missing} have no rubric text")
    if not 0 <= ai_fraction <= 1:
        raise ValueError(f"ai_fraction must lie in [0, 1], got {ai_fraction}")
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    out = []
    for task in tasks:
        rng = random.Random(f"{seed}|feedback|{task['id']}")
        offered = list((model_answers or {}).get(task["id"], []))
        for k in range(answers_per_task):
            if offered and rng.random() < MODEL_SHARE:
                model, answer = offered.pop(rng.randrange(len(offered)))
                kind = f"model:{model}"
            else:
                kind = rng.choices(kinds, weights)[0]
                answer = synth_answer(task, kind, rng)
            source = "ai" if rng.random() < ai_fraction else "human"
            true_dims = verify_dimensions(task, answer)
            overall = verify(task, answer)
            for dim in dimensions:
                true = true_dims[dim]
                if source == "human":
                    score = _round(true, human_round)
                else:
                    score = _round(true + rng.gauss(0.0, ai_noise), ai_round)
                ev = evidence(task, answer, dim)
                user = render_judge_prompt(rubrics[dim], task["prompt"], answer)
                out.append({
                    "id": f"fb-{task['id']}-{k}-{dim}",
                    "task_id": task["id"],
                    "family": task["family"],
                    "split": task.get("split"),
                    "dimension": dim,
                    "source": source,
                    "kind": kind,
                    "question": task["prompt"],
                    "answer": answer,
                    "score": score,
                    "verifier_score": true,
                    "verifier_overall": overall,
                    "evidence": ev,
                    "messages": [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": format_judge_answer(ev, score)},
                    ],
                })
    return out


def write_feedback_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    return write_jsonl(path, records)


def read_feedback_jsonl(path: str | Path) -> list[dict]:
    """Read a feedback file; a row without the required fields is an error naming its line."""
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        missing = [f for f in RECORD_FIELDS if f not in r]
        if missing:
            raise ValueError(f"{path}: row {i}: missing fields {missing}")
        if r["source"] not in ("human", "ai"):
            raise ValueError(f"{path}: row {i}: source must be 'human' or 'ai', got {r['source']!r}")
    return rows
