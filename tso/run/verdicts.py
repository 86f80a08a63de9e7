"""The paper's claims as verdicts with intervals, from one run's held-out evaluation.

Each claim compares two models on the same evaluation prompts: the per-prompt score difference
(verifier when there is one, else the judge), its mean and a 95% t-interval over the prompts. The
verdict: *holds* when the interval excludes 0 in the claimed direction, *contradicted* when it
excludes 0 the other way, else *inconclusive*. The interval covers the prompts and the sampling of
answers in this one run, not the variation between training runs with other seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Z_975 = 1.959963984540054


def t_975(df: int) -> float:
    """The 97.5% quantile of Student's t: a table to 6 degrees of freedom, then a Cornish-Fisher
    expansion around the normal's (within 0.001 of the exact value from 7 on)."""
    exact = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469}
    if df in exact:
        return exact[df]
    z = Z_975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval of ``values`` (None bounds below 2 values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def verdict(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "inconclusive"
    if low > 0:
        return "holds"
    if high < 0:
        return "contradicted"
    return "inconclusive"


def compare(better: str, worse: str, scores: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The claim "``better`` scores above ``worse``", over the prompts both have a score for."""
    a, b = scores.get(better, {}), scores.get(worse, {})
    shared = sorted(set(a) & set(b))
    stats = mean_interval([a[i] - b[i] for i in shared])
    return {"claim": f"{better} > {worse}", "better": better, "worse": worse, **stats,
            "verdict": verdict(stats["low"], stats["high"])}


def _stage(label: str) -> int:
    return int(label.split("-")[1])


def run_claims(labels: Sequence[str]) -> list[tuple[str, str]]:
    """The comparisons one run can make: each TSO stage over the one before (stage 1 over the base),
    the last stage over the base, and the last stage over every baseline."""
    tso = sorted((label for label in labels if label.startswith("tso-")), key=_stage)
    if not tso:
        return []
    pairs = [(tso[0], "base")] if "base" in labels else []
    pairs += list(zip(tso[1:], tso[:-1]))
    if len(tso) > 1 and "base" in labels:
        pairs.append((tso[-1], "base"))
    pairs += [(tso[-1], other) for other in labels if other != "base" and not other.startswith("tso-")]
    return pairs


def claims_from_records(records: dict[str, list[dict]]) -> dict[str, Any]:
    """Verdicts from each model's evaluation records (``eval/<label>.answers.jsonl``); a record without
    a score (unscored by the judge, failed) takes no part in any comparison."""
    has_verifier = any(r.get("verifier") is not None for rs in records.values() for r in rs)
    key = "verifier" if has_verifier else "judge"
    scores = {label: {r["id"]: float(r[key]) for r in rs if r.get(key) is not None} for label, rs in records.items()}
    return {"score": key, "interval": "95% t-interval of the mean per-prompt difference, over evaluation prompts",
            "claims": [compare(a, b, scores) for a, b in run_claims(list(records))]}


def verdict_lines(result: dict[str, Any]) -> list[str]:
    def num(x):
        return "-" if x is None else f"{x:+.3f}"

    return [f"{c['claim']}: {c['verdict']} (mean difference {num(c['mean'])}, 95% interval "
            f"[{num(c['low'])}, {num(c['high'])}], {c['n']} prompts, {result['score']} scores)"
            for c in result["claims"]]
