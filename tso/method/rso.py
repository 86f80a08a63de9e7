"""RSO (statistical rejection sampling optimisation, Liu et al. 2023), the paper's Table 2 baseline:
sample several answers per prompt from the policy, take the judge's score as the reward r, and keep
the samples a rejection sampler accepts towards the optimal policy pi*(y|x) ~ pi(y|x) exp(r / beta);
the accepted samples are paired (first-round ranking: random pairs, the higher reward chosen) and
trained with DPO. Pure functions over scores; the random stream is the caller's keyed one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

#: Rounds over the remaining samples before the sampler gives up (a fixed normaliser far above every
#: reward accepts almost nothing; "max" always accepts the best remaining one in each round).
MAX_ROUNDS = 64


def rso_accept(rewards: Sequence[float], accepted: int, beta: float, rng: random.Random,
               normaliser: str | float = "max") -> list[int]:
    """Indices of the accepted samples, in acceptance order. Each round the normaliser M is the best
    remaining reward (``"max"``, RSO's Algorithm 1) or a fixed bound (a number, e.g. the score scale's
    top: the exact sampler when no reward exceeds it); a sample is accepted when u < exp((r - M) / beta),
    u ~ U[0, 1), one draw per remaining sample per round, until ``accepted`` are taken."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    remaining = list(range(len(rewards)))
    out: list[int] = []
    for _ in range(MAX_ROUNDS):
        if len(out) >= accepted or not remaining:
            break
        bound = max(rewards[i] for i in remaining) if normaliser == "max" else float(normaliser)
        kept = []
        for i in remaining:
            if len(out) < accepted and rng.random() < math.exp(min(0.0, (rewards[i] - bound) / beta)):
                out.append(i)
            else:
                kept.append(i)
        remaining = kept
    return out


def first_round_pairs(indices: Sequence[int], rewards: Sequence[float], rng: random.Random
                      ) -> tuple[list[tuple[int, int]], int]:
    """(chosen, rejected) pairs of the accepted samples, shuffled and taken two by two; the higher
    reward is chosen. Returns the pairs and the number of tied couples (no preference: no pair)."""
    order = list(indices)
    rng.shuffle(order)
    pairs, ties = [], 0
    for a, b in zip(order[0::2], order[1::2]):
        if rewards[a] == rewards[b]:
            ties += 1
        else:
            pairs.append((a, b) if rewards[a] > rewards[b] else (b, a))
    return pairs, ties
