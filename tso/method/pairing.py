"""Preference pair formation over plain records (docs/method.md sections 2-3, paper eq. 9).

Per prompt the pipeline gathers candidate answers: matrix positives (drawn from the alpha mixture),
matrix negatives (gamma mixture) and, for prompts chosen for a self pair, the policy's own samples,
all judged. This module turns those candidates into pairs with provenance; it does no I/O.

Every candidate carries how its generation ended (``finish_reason`` "stop" or "length", and the stop
token), so a pair says whether each side is a finished answer; training appends an end-of-turn
token only to finished ones. A side with no usable candidate gives no pair, with its reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tso.method.rso import first_round_pairs, rso_accept
from tso.method.sources import row_rng


@dataclass(frozen=True)
class Candidate:
    text: str
    source: str  # a matrix model name, "human", or "policy"
    score: float | None = None  # judge score; None = unscored (or not judged)
    unscored_reason: str | None = None
    finish_reason: str = "stop"  # "length": cut by max_new_tokens or the context (kept with pairs.truncated: keep)
    stop_token: str | None = None  # the token that ended the generation (None: human, or cut by length)


@dataclass
class Pair:
    id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_source: str
    rejected_source: str
    chosen_score: float | None
    rejected_score: float | None
    kind: str  # matrix | self | self_chosen | self_rejected | self_reward | rso
    stage: int
    seed: int
    alpha_renormalized: bool = False
    self_scores: list[float | None] = field(default_factory=list)
    chosen_finish_reason: str = "stop"
    rejected_finish_reason: str = "stop"
    chosen_stop_token: str | None = None
    rejected_stop_token: str | None = None

    def to_row(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairRules:
    tau_pos: float = 8.0
    tau_neg: float = 4.0
    self_pair_fraction: float = 0.5
    judge_filter: bool = False
    delta: float = 0.0
    mode: str = "tso"  # "self_reward": best vs worst of the policy's own samples; "rso": rejection sampled
    rso_accepted: int = 8
    rso_beta: float = 0.5
    rso_normaliser: str | float = "max"

    @classmethod
    def from_config(cls, pairs_cfg) -> PairRules:
        return cls(
            tau_pos=pairs_cfg.tau_pos,
            tau_neg=pairs_cfg.tau_neg,
            self_pair_fraction=pairs_cfg.self_pair_fraction,
            judge_filter=pairs_cfg.judge_filter.enabled,
            delta=pairs_cfg.judge_filter.delta,
            mode=pairs_cfg.mode,
            rso_accepted=pairs_cfg.rso.accepted,
            rso_beta=pairs_cfg.rso.beta,
            rso_normaliser=pairs_cfg.rso.normaliser,
        )


def tries_self_pair(seed: int, stage: int, prompt_id: str, fraction: float) -> bool:
    """Whether this prompt aims for a self pair: a keyed draw, so independent of order and batching."""
    if fraction <= 0:
        return False
    return bool(row_rng(seed, stage, prompt_id, "self_pair").random() < fraction)


def route_self_samples(samples: list[Candidate], rules: PairRules) -> tuple[Candidate | None, Candidate | None]:
    """The best sample if it qualifies as a positive (>= tau_pos) and the worst if it qualifies as a
    negative (<= tau_neg). Unscored samples are never used."""
    scored = [s for s in samples if s.score is not None]
    if not scored:
        return None, None
    best = max(scored, key=lambda s: s.score)
    worst = min(scored, key=lambda s: s.score)
    pos = best if best.score >= rules.tau_pos else None
    neg = worst if worst.score <= rules.tau_neg and worst is not best else None
    if neg is None and pos is None and worst.score <= rules.tau_neg:
        neg = worst
    return pos, neg


def rso_combos(prompt_id: str, samples: list[Candidate], rules: PairRules, *, stage: int, seed: int,
               counts: dict[str, int]) -> list[tuple[Candidate, Candidate]]:
    """RSO's pairs of one prompt: the scored samples through the rejection sampler, then paired. Unscored
    samples take no part (no reward, never a default one); the draws are keyed to the prompt."""
    scored = [s for s in samples if s.score is not None]
    rewards = [s.score for s in scored]
    rng = row_rng(seed, stage, prompt_id, "rso")
    accepted = rso_accept(rewards, rules.rso_accepted, rules.rso_beta, rng, rules.rso_normaliser)
    pairs, ties = first_round_pairs(accepted, rewards, rng)
    counts["rso_accepted"] = len(accepted)
    if ties:
        counts["rso_ties"] = ties
    return [(scored[a], scored[b]) for a, b in pairs]


def passes_judge_filter(chosen: Candidate, rejected: Candidate, rules: PairRules) -> bool:
    if not rules.judge_filter:
        return True
    if chosen.score is None or rejected.score is None:
        return False
    return chosen.score > rejected.score + rules.delta


def form_pairs(
    prompt_id: str,
    prompt: str,
    positives: list[Candidate],
    negatives: list[Candidate],
    self_samples: list[Candidate],
    rules: PairRules,
    *,
    stage: int,
    seed: int,
    try_self: bool,
    alpha_renormalized: bool = False,
) -> tuple[list[Pair], dict[str, int]]:
    """Pairs for one prompt and counts of what happened (kinds, filtered, and ``no_positive`` /
    ``no_negative`` / ``no_self_pair`` when a side has no candidate).

    Matrix pairs zip positives with negatives (the longer list cycles). A self-pair prompt pairs the
    policy's best against its worst when both qualify; when one side qualifies it is paired with a
    matrix answer for the other side; when neither does, the prompt gives matrix pairs.
    """
    counts: dict[str, int] = {}
    self_pos, self_neg = route_self_samples(self_samples, rules) if try_self else (None, None)
    if rules.mode == "rso":
        combos, kind = rso_combos(prompt_id, self_samples, rules, stage=stage, seed=seed, counts=counts), "rso"
        if not combos:
            counts["no_self_pair"] = 1
            return [], counts
    elif rules.mode == "self_reward":
        scored = [s for s in self_samples if s.score is not None]
        best = max(scored, key=lambda s: s.score, default=None)
        worst = min(scored, key=lambda s: s.score, default=None)
        if best is None or best.score <= worst.score:
            return [], {"no_self_pair": 1}
        combos, kind = [(best, worst)], "self_reward"
    elif self_pos is not None and self_neg is not None:
        combos, kind = [(self_pos, self_neg)], "self"
    elif self_pos is not None and negatives:
        combos, kind = [(self_pos, negatives[0])], "self_chosen"
    elif self_neg is not None and positives:
        combos, kind = [(positives[0], self_neg)], "self_rejected"
    elif not positives or not negatives:
        return [], {"no_positive" if not positives else "no_negative": 1}
    else:
        n = max(len(positives), len(negatives))
        combos, kind = [(positives[i % len(positives)], negatives[i % len(negatives)]) for i in range(n)], "matrix"
    pairs = []
    for chosen, rejected in combos:
        if not passes_judge_filter(chosen, rejected, rules):
            counts["filtered"] = counts.get("filtered", 0) + 1
            continue
        counts[kind] = counts.get(kind, 0) + 1
        pairs.append(
            Pair(
                id=prompt_id if len(combos) == 1 else f"{prompt_id}#{len(pairs)}",
                prompt=prompt,
                chosen=chosen.text,
                rejected=rejected.text,
                chosen_source=chosen.source,
                rejected_source=rejected.source,
                chosen_score=chosen.score,
                rejected_score=rejected.score,
                kind=kind,
                stage=stage,
                seed=seed,
                alpha_renormalized=alpha_renormalized,
                self_scores=[s.score for s in self_samples],
                chosen_finish_reason=chosen.finish_reason,
                rejected_finish_reason=rejected.finish_reason,
                chosen_stop_token=chosen.stop_token,
                rejected_stop_token=rejected.stop_token,
            )
        )
    return pairs, counts
