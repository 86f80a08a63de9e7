"""RSO's rejection sampler and pairing (tso.method.rso), checked against hand-computed examples."""

import math
import random

import pytest

from tso.config import ConfigError, RsoConfig
from tso.method.pairing import Candidate, PairRules, form_pairs
from tso.method.rso import MAX_ROUNDS, first_round_pairs, rso_accept
from tso.method.sources import row_rng


class Script:
    """A random stream that returns the given numbers in order (and records how many were drawn)."""

    def __init__(self, *values: float):
        self.values, self.drawn = list(values), 0

    def random(self) -> float:
        self.drawn += 1
        return self.values.pop(0)

    def shuffle(self, seq) -> None:  # leave the order as it is
        pass


def test_acceptance_by_hand_with_the_max_normaliser():
    # rewards 9, 7, 5, beta 1. Round 1, M = 9: accept iff u < exp(0) = 1, exp(-2) = 0.135, exp(-4) = 0.0183
    rng = Script(0.99, 0.2, 0.01)
    assert rso_accept([9.0, 7.0, 5.0], accepted=2, beta=1.0, rng=rng) == [0, 2] and rng.drawn == 3
    rng = Script(0.99, 0.2, 0.5, 0.999, 0.01)
    # round 1 accepts 0 only (0.2 >= 0.135, 0.5 >= 0.0183); round 2, M = 7: 1 (u 0.999 < 1), then 2
    # against exp(-2) = 0.135 with u 0.01: accepted
    assert rso_accept([9.0, 7.0, 5.0], accepted=3, beta=1.0, rng=rng) == [0, 1, 2] and rng.drawn == 5


def test_acceptance_by_hand_with_a_fixed_normaliser_and_beta():
    # M = 10, beta 0.5: exp(-2) = 0.135 for 9, exp(-6) = 0.0025 for 7
    rng = Script(0.1, 0.1, 0.13, 0.002)
    assert rso_accept([9.0, 7.0], accepted=2, beta=0.5, rng=rng, normaliser=10.0) == [0, 1]
    # a fixed bound the rewards never get near accepts (almost) nothing: the rounds are bounded
    rng = random.Random(0)
    assert rso_accept([2.0, 2.5], accepted=2, beta=0.05, rng=rng, normaliser=10.0) == []
    # a reward above a fixed bound is accepted for sure (the acceptance probability is capped at 1)
    assert rso_accept([12.0], accepted=1, beta=1.0, rng=Script(0.999), normaliser=10.0) == [0]
    with pytest.raises(ValueError, match="beta must be positive"):
        rso_accept([1.0], accepted=1, beta=0.0, rng=Script())
    assert MAX_ROUNDS >= 8


def test_acceptance_frequency_over_many_prompts():
    """Two samples, one wanted, beta 1, rewards 1 apart: the lower one is tried first and kept when its
    draw passes u < exp(4 - 5); otherwise the better one (exp(0) = 1) is. So the lower is kept e^-1 of
    the time."""
    kept_low = 0
    n = 20000
    rng = random.Random(3)
    for _ in range(n):
        kept_low += rso_accept([4.0, 5.0], accepted=1, beta=1.0, rng=rng) == [0]
    assert kept_low / n == pytest.approx(math.exp(-1), abs=0.015)


def test_first_round_pairs_choose_the_higher_reward_and_skip_ties():
    pairs, ties = first_round_pairs([0, 1, 2, 3, 4], [3.0, 8.0, 6.0, 6.0, 9.0], Script())
    assert pairs == [(1, 0)] and ties == 1  # (0, 1) -> 8 over 3; (2, 3) tie; 4 left without a partner
    pairs, _ = first_round_pairs([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0], random.Random(5))
    assert sorted(a for a, _ in pairs) == sorted({a for a, _ in pairs}) and all(b < a for a, b in pairs)


def test_rso_mode_forms_pairs_from_scored_samples_only_keyed_to_the_prompt():
    rules = PairRules(mode="rso", rso_accepted=4, rso_beta=0.5)
    samples = [Candidate(t, "policy", s, None if s is not None else "no_score")
               for t, s in (("a", 9.0), ("b", 3.0), ("c", None), ("d", 8.5), ("e", 2.0), ("f", 7.0))]
    pairs, counts = form_pairs("p7", "q", [], [], samples, rules, stage=2, seed=11, try_self=True)
    # the same draws by hand: the scored samples, the prompt's keyed stream
    scored = [s for s in samples if s.score is not None]
    rng = row_rng(11, 2, "p7", "rso")
    idx = rso_accept([s.score for s in scored], 4, 0.5, rng)
    want, _ = first_round_pairs(idx, [s.score for s in scored], rng)
    assert [(p.chosen, p.rejected) for p in pairs] == [(scored[a].text, scored[b].text) for a, b in want]
    assert pairs and all(p.kind == "rso" and p.chosen_score > p.rejected_score for p in pairs)
    assert "c" not in {p.chosen for p in pairs} | {p.rejected for p in pairs}
    assert counts["rso"] == len(pairs) and counts["rso_accepted"] == len(idx) == 4
    assert len({p.id for p in pairs}) == len(pairs) and all(p.id.startswith("p7") for p in pairs)
    again, _ = form_pairs("p7", "q", [], [], samples, rules, stage=2, seed=11, try_self=True)
    assert [p.to_row() for p in again] == [p.to_row() for p in pairs]
    # all scores equal: every couple ties, no pair
    flat = [Candidate(str(i), "policy", 5.0) for i in range(4)]
    pairs, counts = form_pairs("p8", "q", [], [], flat, rules, stage=2, seed=11, try_self=True)
    assert pairs == [] and counts == {"rso_accepted": 4, "rso_ties": 2, "no_self_pair": 1}


def test_builtin_rso_and_its_settings():
    from tso.config import load_config_ref

    cfg, _ = load_config_ref("builtin:rso", [])
    assert cfg.pairs.mode == "rso" and (cfg.pairs.rso.samples, cfg.pairs.rso.accepted) == (8, 4)
    assert cfg.train.minibatches == 1 and cfg.train.loss.type == "dpo" and cfg.stages == 1
    default = RsoConfig()
    assert (default.samples, default.accepted, default.beta, default.normaliser) == (64, 8, 0.5, "max")
    with pytest.raises(ConfigError, match=r"pairs.rso: .*accepted \(9\) cannot exceed samples \(8\)"):
        load_config_ref("builtin:rso", ["pairs.rso.accepted=9"])
    with pytest.raises(ConfigError, match=r"pairs.rso.normaliser"):
        load_config_ref("builtin:rso", ["pairs.rso.normaliser=min"])
