"""The quality ladder check: a pure function on a manifest dict (ENGINEERING.md, "Tests that can fail").

Held-out mean verifier score must rise strictly with size within each version and with version
within each size, each step by at least ``min_step`` (0.3 on the 2..10 scale), measured on at
least ``min_prompts`` held-out prompts; and the base model must have a weaker and a stronger
neighbour (an older version or smaller size below it, a larger size above it), or TSO has no
negatives or positives to draw from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_STEP = 0.3
MIN_PROMPTS = 300


@dataclass(frozen=True)
class LadderResult:
    ok: bool
    reasons: list[str] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # every compared pair, with its gain

    def to_dict(self) -> dict:
        return {"ok": self.ok, "reasons": list(self.reasons), "steps": list(self.steps)}


def _step(lo: dict, hi: dict, kind: str, group: str, min_step: float) -> tuple[dict, str | None]:
    gain = hi["heldout_score"] - lo["heldout_score"]
    row = {"kind": kind, "group": group, "from": lo["name"], "to": hi["name"], "gain": round(gain, 4)}
    if gain < min_step - 1e-9:
        what = "does not rise" if gain <= 0 else f"rises by only {gain:+.2f}"
        return row, (
            f"{kind} step {lo['name']} ({lo['heldout_score']:.2f}) -> {hi['name']} ({hi['heldout_score']:.2f}) "
            f"in {group}: {what}, needs at least +{min_step:g}"
        )
    return row, None


def check_ladder(manifest: dict, min_step: float = MIN_STEP, min_prompts: int = MIN_PROMPTS) -> LadderResult:
    """Check the manifest's held-out scores; every failure is a reason naming the pair that fails."""
    models = list((manifest.get("models") or {}).values())
    reasons: list[str] = []
    if not models:
        return LadderResult(False, ["the manifest lists no models"])
    scored = []
    for m in models:
        if not isinstance(m.get("heldout_score"), (int, float)):
            reasons.append(f"model {m.get('name')!r} has no held-out score")
        else:
            scored.append(m)
    n_prompts = (manifest.get("eval") or {}).get("prompts")
    if not isinstance(n_prompts, int) or n_prompts < min_prompts:
        reasons.append(f"held-out scores were measured on {n_prompts} prompts, need at least {min_prompts}")

    steps: list[dict] = []
    versions = sorted({m["version"] for m in scored})
    for v in versions:
        row = sorted((m for m in scored if m["version"] == v), key=lambda m: m["params"])
        for lo, hi in zip(row, row[1:]):
            if lo["params"] == hi["params"]:
                reasons.append(f"{lo['name']} and {hi['name']} (version {v}) have the same size")
                continue
            step, why = _step(lo, hi, "size", f"version {v}", min_step)
            steps.append(step)
            if why:
                reasons.append(why)
    for label in sorted({m["size_label"] for m in scored}):
        col = sorted((m for m in scored if m["size_label"] == label), key=lambda m: m["version"])
        for lo, hi in zip(col, col[1:]):
            step, why = _step(lo, hi, "version", f"size {label}", min_step)
            steps.append(step)
            if why:
                reasons.append(why)

    base_name = manifest.get("base")
    if base_name is not None:
        reasons.extend(_base_neighbours(base_name, models))
    return LadderResult(not reasons, reasons, steps)


def _base_neighbours(base_name: str, models: list[dict]) -> list[str]:
    by_name = {m.get("name"): m for m in models}
    if base_name not in by_name:
        return [f"base {base_name!r} is not a model of the matrix"]
    base = by_name[base_name]
    weaker = [m for m in models if m is not base and (
        m["params"] < base["params"] or (m["size_label"] == base["size_label"] and m["version"] < base["version"]))]
    stronger = [m for m in models if m["params"] > base["params"]]
    out = []
    if not weaker:
        out.append(f"base {base_name!r} has no weaker neighbour (no smaller size, no older version of its size)")
    if not stronger:
        out.append(f"base {base_name!r} has no stronger neighbour (no larger size)")
    return out
