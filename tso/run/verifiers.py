"""Ground-truth scorers for evaluation (``eval.verifier``): ``none``, ``toyworld`` or ``module:function``.

A verifier is ``fn(prompt, response, metadata) -> score``: a number on the judge's 2..10 scale, None
when it cannot tell, or a mapping ``{"score": ..., "dimensions": {name: score}}``. Without one,
evaluation and the report claim no ground truth: every score is the judge's.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

from tso.config import ConfigError
from tso.method.judging import SCORE_MAX, SCORE_MIN

BUILTIN = {"toyworld": "tso.toyworld.verifier:score_answer"}

Verifier = Callable[[object, str, dict], object]


def load_verifier(spec: str, source: str = "<config>") -> Verifier | None:
    """The callable named by ``eval.verifier`` (None for "none"); a spec that does not import is an
    error naming the field, raised before any model runs."""
    if spec == "none":
        return None
    target = BUILTIN.get(spec, spec)
    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(source, "eval.verifier", f"cannot load {target!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(source, "eval.verifier", f"{target!r} is not callable")
    return fn


def ground_truth(fn: Verifier, row: dict, answer: str) -> tuple[float | None, dict | None]:
    """(score, per-dimension scores) of one answer; a value off the 2..10 scale counts as no score."""
    out = fn(row["prompt"], answer, dict(row.get("metadata") or {}))
    score, dims = (out.get("score"), out.get("dimensions")) if isinstance(out, dict) else (out, None)
    if score is None:
        return None, dims
    score = float(score)
    return (score if math.isfinite(score) and SCORE_MIN <= score <= SCORE_MAX else None), dims
