"""Training metrics as JSON lines, one record per event, appended as training goes.

Records have a ``kind``:
- ``step``: one optimizer step (loss, rewards, margin, accuracy, grad scale, clip fractions, grad norm,
  lr, mini-batch, epoch, step, pairs/s, tokens/s, ...);
- ``reference``: a reference pass (the hot-swap) before mini-batch ``minibatch``;
- ``boundary``: mini-batch ``boundary`` finished and a checkpoint was saved;
- ``summary``: the end of a run.
A resumed run appends to the same file; its records carry ``resumed_from`` (the boundary it restarted
from). Readers keep the last record of each step, so the steps redone after a failure replace the
lost attempt's, and a line cut short by a killed process is skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a missing number says "not finite" without breaking readers
    return value


class MetricsLog:
    """Append-only JSONL writer (flushed per record). Only rank 0 writes: pass ``enabled=False`` elsewhere."""

    def __init__(self, path: str | Path | None, enabled: bool = True):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


#: Printed step lines per stage when ``train.log_every`` is not set (the job log stays readable).
LOG_LINES_PER_STAGE = 20


def log_interval(log_every: int | None, total_steps: int) -> int:
    """Steps between printed step lines: the configured ``log_every``, else about LOG_LINES_PER_STAGE."""
    return log_every or max(1, math.ceil(total_steps / LOG_LINES_PER_STAGE))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the last line of a killed writer
    return out


def read_steps(path: str | Path, stage: int | None = None) -> list[dict[str, Any]]:
    """Step records, the last of each step number, in step order."""
    last: dict[tuple[int, int], dict[str, Any]] = {}
    for r in read_records(path):
        if r.get("kind") == "step" and (stage is None or r.get("stage") == stage):
            last[(r.get("stage", 0), r["step"])] = r
    return [last[k] for k in sorted(last)]


def read_kind(path: str | Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in read_records(path) if r.get("kind") == kind]


def boundary_steps(steps: list[dict[str, Any]]) -> list[int]:
    """Step numbers after which a mini-batch ended (the reference was swapped)."""
    out = []
    for prev, cur in zip(steps, steps[1:]):
        if cur["minibatch"] != prev["minibatch"] or cur.get("stage") != prev.get("stage"):
            out.append(prev["step"])
    return out


def format_step(r: dict[str, Any], total_steps: int, num_minibatches: int, epochs: int) -> str:
    """The per-step progress line."""
    def f(key, fmt):
        v = r.get(key)
        return "-" if v is None else format(v, fmt)

    line = (
        f"[stage {r.get('stage', 0)}] step {r['step']}/{total_steps} mb {r['minibatch']}/{num_minibatches} "
        f"ep {r['epoch']}/{epochs} loss {f('loss', '.4f')} r_w {f('reward_chosen', '+.3f')} "
        f"r_l {f('reward_rejected', '+.3f')} margin {f('margin', '+.3f')} acc {f('accuracy', '.2f')} "
        f"gscale {f('grad_scale', '.3f')} |g| {f('grad_norm', '.3f')} lr {f('lr', '.2e')} "
        f"{f('pairs_per_s', '.1f')} pairs/s {f('tokens_per_s', '.0f')} tok/s"
    )
    if r.get("clip_frac_chosen") is not None:
        line += f" clip w/l {r['clip_frac_chosen']:.2f}/{r['clip_frac_rejected']:.2f}"
    return line
