"""How good a judge is, on held-out scored feedback: how often its answer holds a score, how its
scores rank against the targets (Spearman), and how close they are. A run reports it for its judge;
the uncorrected base measured the same way is the baseline the correction must beat."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from tso.method.judging import extract_score
from tso.train.feedback import split_messages


def _ranks(x: np.ndarray) -> np.ndarray:
    order = x.argsort(kind="stable")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # average ranks of ties
        m = x == v
        ranks[m] = ranks[m].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def judge_answers(path: str, prompts: list[list[dict]], max_new_tokens: int, options: dict | None = None) -> list[str]:
    """Greedy answers of the judge at ``path`` through the transformers generation engine."""
    from tso.config import EngineConfig
    from tso.engines import SamplingParams
    from tso.engines.factory import make_engine

    engine = make_engine(EngineConfig(kind="transformers", dtype="float32", max_batch_size=16), str(path), options)
    params = [SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)] * len(prompts)
    return [r.texts[0] for r in engine.generate(prompts, params)]


def evaluate_judge(path, records: Sequence[dict], max_new_tokens: int = 48, options: dict | None = None
                   ) -> dict[str, Any]:
    """Parse rate, Spearman correlation with the target scores, mean absolute error and the fraction
    within 1 point of the target (an unscored answer counts as a miss) on held-out feedback records."""
    prompts, truth = [], []
    for r in records:
        msgs, answer = split_messages(r)
        target = extract_score(answer)
        if target.score is None:
            raise ValueError(f"held-out record has no target score: {answer!r}")
        prompts.append(msgs)
        truth.append(target.score)
    outputs = judge_answers(path, prompts, max_new_tokens, options)
    verdicts = [extract_score(o) for o in outputs]
    scored = [(v.score, t) for v, t in zip(verdicts, truth) if v.score is not None]
    n = len(records)
    within = sum(1 for v, t in zip(verdicts, truth) if v.score is not None and abs(v.score - t) <= 1.0)
    return {
        "n": n,
        "parse_rate": len(scored) / n if n else 0.0,
        "within_1": within / n if n else 0.0,
        "mae": float(np.mean([abs(s - t) for s, t in scored])) if scored else None,
        "spearman": spearman([s for s, _ in scored], [t for _, t in scored]) if scored else None,
        "unscored_reasons": dict(Counter(v.reason for v in verdicts if v.reason)),
        "outputs": outputs[:5],
    }
