"""Small synthetic training data with a learnable signal, for the tests of the training machinery.

- Pairs: "a+b=" -> chosen is the right sum, rejected a wrong one: a preference a tiny model can learn.
- Feedback: judge prompts over three kinds of answer (complete, terse, missing) whose target scores
  are 9, 6 and 3: a tiny judge can learn to score them, a random one cannot.
Real feedback data comes from tso.toyworld; these only exercise the training machinery.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tso.io import atomic_write_jsonl, atomic_write_parquet
from tso.method.judging import format_judge_answer, render_judge_prompt


def arithmetic_pairs(n: int, seed: int = 0, prefix: str = "p", filler: int = 0) -> list[dict[str, Any]]:
    """``filler`` > 0 pads prompt and responses with that many extra characters (benchmark shapes)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        pad = " ".join(str(rng.randrange(10)) for _ in range(filler // 2)) if filler else ""
        prompt = f"{pad} {a}+{b}=" if pad else f"{a}+{b}="
        chosen, rejected = str(a + b), str(wrong)
        if filler:
            chosen, rejected = f"{chosen} {pad}", f"{rejected} {pad}"
        rows.append({"id": f"{prefix}{i:05d}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "chosen_source": "toy", "rejected_source": "toy"})
    return rows


def write_pairs(rows: list[dict[str, Any]], path: str | Path) -> Path:
    return atomic_write_parquet(path, rows)


FEEDBACK_KINDS = (("The answer is {c}.", "complete", 9.0), ("{c}", "terse", 6.0), ("no idea", "missing", 3.0))


def toy_feedback(n: int, seed: int = 0, rubric: str = "Rate the answer.") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        template, evidence, score = FEEDBACK_KINDS[rng.randrange(len(FEEDBACK_KINDS))]
        prompt = render_judge_prompt(rubric, f"{a}+{b}=?", template.format(c=a + b))
        out.append({"id": f"fb{seed}-{i:05d}", "score": score,
                    "messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": format_judge_answer(evidence, score)}]})
    return out


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    return atomic_write_jsonl(path, rows)
