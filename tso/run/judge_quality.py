"""How good a judge is, on held-out scored feedback: how often its answer holds a score, how its
scores rank against the targets (Spearman), and how close they are. A run reports it for its judge;
the uncorrected base measured the same way is the baseline the correction must beat."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
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


def judge_answers(path: str, prompts: list[list[dict]], max_new_tokens: int, options: dict | None = None,
                  engine_config=None) -> list[str]:
    """Greedy answers of the judge at ``path`` through the transformers generation engine (``engine_config``:
    an EngineConfig for its device, dtype and batch; default fp32, batches of 16)."""
    from tso.config import EngineConfig
    from tso.engines import SamplingParams
    from tso.engines.factory import make_engine

    config = engine_config or EngineConfig(kind="transformers", dtype="float32", max_batch_size=16)
    engine = make_engine(config.model_copy(update={"kind": "transformers"}), str(path), options)
    params = [SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)] * len(prompts)
    return [r.texts[0] for r in engine.generate(prompts, params)]


_ANSWER_START, _ANSWER_END = "[The Start of Assistant's Answer]", "[The End of Assistant's Answer]"

#: The engineering rule a corrected judge must meet on held-out feedback.
RULE = {"parse_rate": 0.95, "spearman": 0.5}


def judged_answer(record: dict) -> str:
    """The answer a feedback record scores: its ``answer`` field, else the text between the rubric
    prompt's answer markers, else the whole last user turn (what a length-only predictor measures)."""
    if isinstance(record.get("answer"), str):
        return record["answer"]
    msgs, _ = split_messages(record)
    text = msgs[-1]["content"]
    if _ANSWER_START in text and _ANSWER_END in text:
        return text.split(_ANSWER_START, 1)[1].split(_ANSWER_END, 1)[0].strip()
    return text


def _targets(records: Sequence[dict]) -> tuple[list[list[dict]], list[float], list[str]]:
    prompts, truth, dims = [], [], []
    for r in records:
        msgs, answer = split_messages(r)
        target = extract_score(answer)
        if target.score is None:
            raise ValueError(f"held-out record {r.get('id', '?')} has no target score: {answer!r}")
        prompts.append(msgs)
        truth.append(target.score)
        dims.append(str(r.get("dimension") or "overall"))
    return prompts, truth, dims


def _per_dimension(pred: Sequence[float | None], truth: Sequence[float], dims: Sequence[str]) -> dict[str, float | None]:
    out = {}
    for d in sorted(set(dims)):
        pts = [(p, t) for p, t, dd in zip(pred, truth, dims) if dd == d and p is not None]
        out[d] = spearman([p for p, _ in pts], [t for _, t in pts])
    return out


def score_quality(outputs: Sequence[str], truth: Sequence[float], dims: Sequence[str]) -> dict[str, Any]:
    """Parse rate, Spearman with the targets (overall and per dimension), mean absolute error and the
    fraction within 1 point of the target, of judge answers against target scores. An answer without a
    score is a miss: it counts against the parse rate and within-1, and is left out of the correlations."""
    verdicts = [extract_score(o) for o in outputs]
    pred = [v.score for v in verdicts]
    scored = [(s, t) for s, t in zip(pred, truth) if s is not None]
    n = len(outputs)
    within = sum(1 for s, t in zip(pred, truth) if s is not None and abs(s - t) <= 1.0)
    return {
        "n": n,
        "parse_rate": len(scored) / n if n else 0.0,
        "within_1": within / n if n else 0.0,
        "mae": float(np.mean([abs(s - t) for s, t in scored])) if scored else None,
        "spearman": spearman([s for s, _ in scored], [t for _, t in scored]) if scored else None,
        "spearman_per_dimension": _per_dimension(pred, truth, dims),
        "unscored_reasons": dict(Counter(v.reason for v in verdicts if v.reason)),
        "outputs": list(outputs[:5]),
    }


def length_only(records: Sequence[dict], truth: Sequence[float], dims: Sequence[str]) -> dict[str, Any]:
    """The floor a judge must beat: rank answers by their length alone. Reported in its better direction
    (the absolute correlation), so the floor is as high as length can make it."""
    lengths = [float(len(judged_answer(r))) for r in records]
    rho = spearman(lengths, truth)
    per_dim = _per_dimension(lengths, truth, dims)
    return {"n": len(records), "spearman": abs(rho) if rho is not None else None,
            "direction": None if rho is None else ("longer is better" if rho > 0 else "shorter is better"),
            "spearman_per_dimension": {d: (abs(v) if v is not None else None) for d, v in per_dim.items()}}


def rule_check(judge: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """The engineering rule, clause by clause: parsed often enough, ranks like the targets, beats length."""
    rho, floor_rho = judge.get("spearman"), floor.get("spearman")
    checks = {
        f"parse_rate >= {RULE['parse_rate']}": judge["parse_rate"] >= RULE["parse_rate"],
        f"spearman >= {RULE['spearman']}": rho is not None and rho >= RULE["spearman"],
        "beats length-only": rho is not None and (floor_rho is None or rho > floor_rho),
    }
    return {"checks": checks, "holds": all(checks.values())}


def spread(records: Sequence[dict], limit: int) -> list[dict]:
    """At most ``limit`` records, a fixed random sample (seed 0) in file order: not the file's first ones
    (files are grouped by task), and not every k-th one (a file that cycles through the dimensions
    would give one dimension only)."""
    if len(records) <= limit:
        return list(records)
    import random

    return [records[i] for i in sorted(random.Random(0).sample(range(len(records)), limit))]


def read_held_out(path: str | Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """Held-out records with a target score; malformed lines are rejects (line, reason), never fatal."""
    records, rejects = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                _, answer = split_messages(r)
                if extract_score(answer).score is None:
                    raise ValueError("the assistant turn holds no target score")
                records.append(r)
            except (ValueError, TypeError) as e:
                rejects.append((n, str(e)))
    return records, rejects


def measure_judge(judge_path: str, base_path: str, held_out: str | Path, *, max_records: int = 200,
                  max_new_tokens: int = 256, judge_options: dict | None = None, base_options: dict | None = None,
                  same_model: bool = False, engine_config=None) -> dict[str, Any]:
    """The run's judge and the uncorrected base side by side on held-out feedback, with the length-only
    floor and the engineering rule. ``same_model``: the judge is the base (an uncorrected run)."""
    records, rejects = read_held_out(held_out)
    if not records:
        raise ValueError(f"{held_out}: no held-out record with a target score ({len(rejects)} rejected)")
    records = spread(records, max_records)
    prompts, truth, dims = _targets(records)
    judge = score_quality(judge_answers(judge_path, prompts, max_new_tokens, judge_options, engine_config), truth, dims)
    base = judge if same_model else score_quality(
        judge_answers(base_path, prompts, max_new_tokens, base_options, engine_config), truth, dims)
    floor = length_only(records, truth, dims)
    return {"held_out": str(held_out), "records": len(records), "rejected_lines": [list(r) for r in rejects[:20]],
            "rejected": len(rejects), "dimensions": sorted(set(dims)), "judge_path": str(judge_path),
            "base_path": str(base_path), "judge": judge, "base": base, "length_only": floor,
            "rule": rule_check(judge, floor), "max_new_tokens": max_new_tokens}
