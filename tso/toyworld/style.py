"""Chatter: the toy world's alignment target beside correctness.

Real base models often wrap an answer in filler ("Sure, ...", "The answer is ...") that the user
did not ask for. The zoo gives each model a *chatter rate*: that share of its SFT targets is the
right answer behind a short filler prefix; older versions and smaller sizes chatter more (demo
matrix: 0.8 for v1-s down to 0.4 for v2-l), and a model then answers chattily about as often as it
was taught to. The verifier keeps the answer correct (the prefixes are filler words, never answer
candidates) but costs conciseness: a chatty right answer scores 7.7 to 8.2 instead of 10, a chatty
wrong one about 1 point less. That is the part of the score preference optimisation can move;
correctness mostly needs knowledge the tiny models do not have.
"""

from __future__ import annotations

import hashlib

# Filler words only (tso.toyworld.verifier.FILLER_WORDS), so the answer stays the last candidate.
CHATTER_PREFIXES = ("The answer is ", "Sure! It is ", "Answer: ", "Ok, it is ")


def _unit(*key) -> float:
    """A uniform number in [0, 1) keyed by ``key``."""
    digest = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def chatty(answer: str, task_id: str, seed: int) -> str:
    """The answer behind one of the filler prefixes (which one is keyed by the task)."""
    prefix = CHATTER_PREFIXES[int(_unit(seed, "prefix", task_id) * len(CHATTER_PREFIXES))]
    return prefix + answer


def styled_answer(task: dict, rate: float, seed: int) -> str:
    """The SFT target of ``task`` for a model with chatter ``rate``: chatty for that share of tasks.
    The draw is keyed by task id only, so a task chatty at rate 0.4 is chatty at 0.5 too."""
    if rate > 0 and _unit(seed, "chatter", task["id"]) < rate:
        return chatty(task["human"], task["id"], seed)
    return task["human"]
