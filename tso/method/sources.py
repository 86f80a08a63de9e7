"""Positive and negative sources of the model matrix and their mixing weights (docs/method.md section 1).

Defaults follow the paper: positives are the newest version of the largest size plus the human
responses (alpha 0.5 / 0.5); negatives are earlier versions of the base's size and every version of
each smaller size (gamma uniform). The base itself is in neither set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

HUMAN = "human"
_TOL = 1e-6


@dataclass(frozen=True)
class Mixtures:
    alpha: dict[str, float]  # positive source -> weight ("human" included when used)
    gamma: dict[str, float]  # negative source -> weight

    @property
    def positives(self) -> list[str]:
        return list(self.alpha)

    @property
    def negatives(self) -> list[str]:
        return list(self.gamma)


def _default_roles(models, base_name: str) -> tuple[list[str], list[str]]:
    base = next(m for m in models if m.name == base_name)
    largest = max(m.size for m in models)
    newest_largest = max(m.version for m in models if m.size == largest)
    pos = [m.name for m in models if m.size == largest and m.version == newest_largest and m.name != base_name]
    neg = [
        m.name
        for m in models
        if m.name != base_name and ((m.size == base.size and m.version < base.version) or m.size < base.size)
    ]
    return pos, neg


def _weights(models, names: list[str], default: dict[str, float], what: str) -> dict[str, float]:
    given = {m.name: m.weight for m in models if m.name in names and m.weight is not None}
    if not given:
        return default
    if len(given) != len(names):
        missing = sorted(set(names) - set(given))
        raise ValueError(f"{what} sources {missing} have no weight while others do: give all or none")
    return {n: float(given[n]) for n in names}


def resolve_sources(
    matrix, human_weight: float, positive_sources: list[str] | None = None, negative_sources: list[str] | None = None
) -> Mixtures:
    """The alpha and gamma mixtures of a matrix config; raises ValueError on any inconsistency.

    Sets come from explicit lists when given, else from each model's role ("auto" = the paper's rule).
    """
    models = matrix.models
    names = [m.name for m in models]
    for what, listed in (("positive_sources", positive_sources), ("negative_sources", negative_sources)):
        unknown = sorted(set(listed or []) - set(names))
        if unknown:
            raise ValueError(f"pairs.{what} names models that are not in the matrix: {unknown}")
    auto_pos, auto_neg = _default_roles(models, matrix.base)
    pos = [m.name for m in models if m.role == "positive" or (m.role == "auto" and m.name in auto_pos)]
    neg = [m.name for m in models if m.role == "negative" or (m.role == "auto" and m.name in auto_neg)]
    if positive_sources is not None:
        pos = [n for n in names if n in positive_sources]
    if negative_sources is not None:
        neg = [n for n in names if n in negative_sources]
    overlap = set(pos) & set(neg)
    if overlap:
        raise ValueError(f"models {sorted(overlap)} are both positive and negative sources")
    if not neg:
        raise ValueError("the matrix has no negative source (needs a smaller size or an older version of the base)")
    if not pos and human_weight <= 0:
        raise ValueError("the matrix has no positive source and pairs.human_weight is 0")

    model_share = 1.0 - human_weight if pos else 0.0
    default_alpha = {n: model_share / len(pos) for n in pos}
    alpha = _weights(models, pos, default_alpha, "positive")
    if human_weight > 0:
        alpha = {HUMAN: human_weight if pos else 1.0, **alpha}
    total = sum(alpha.values())
    if abs(total - 1.0) > _TOL:
        raise ValueError(f"positive weights (human_weight + model weights) sum to {total:.6g}, not 1")

    gamma = _weights(models, neg, {n: 1.0 / len(neg) for n in neg}, "negative")
    total = sum(gamma.values())
    if abs(total - 1.0) > _TOL:
        raise ValueError(f"negative weights sum to {total:.6g}, not 1")
    return Mixtures(alpha=alpha, gamma=gamma)


def row_rng(seed: int, stage: int, prompt_id: str, role: str) -> np.random.Generator:
    """A generator keyed by (seed, stage, prompt id, role): the same draw whatever the batching or order."""
    digest = hashlib.sha256(f"{seed}|{stage}|{prompt_id}|{role}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def row_seed(seed: int, stage: int, prompt_id: str, role: str) -> int:
    """A 31-bit integer seed for a generation engine, keyed like row_rng."""
    return int(row_rng(seed, stage, prompt_id, role).integers(0, 2**31 - 1))


def draw_source(weights: dict[str, float], rng: np.random.Generator, available: set[str] | None = None) -> tuple[str, bool]:
    """Draw one source; renormalise over `available` (e.g. no human answer). Returns (source, renormalised)."""
    names = [n for n in weights if available is None or n in available]
    if not names:
        raise ValueError("no source available to draw from")
    w = np.array([weights[n] for n in names], dtype=float)
    if w.sum() <= 0:
        raise ValueError("the available sources all have weight 0")
    renorm = len(names) != len(weights)
    return names[int(rng.choice(len(names), p=w / w.sum()))], renorm
