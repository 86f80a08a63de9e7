"""The zoo's manifest: what was built, with which settings, and how good each model is.

``$TSO_HOME/zoo/manifest.json`` holds one entry per model (name, version, size label, parameter
count, path, training budget, held-out score, build time, the hash of its build settings) and the
matrix's status ("ok", "failed" with reasons, or "building"). It is rewritten atomically after
every model, so an interrupted build keeps what it finished.
"""

from __future__ import annotations

import json
from pathlib import Path

from tso.io import atomic_write_text, json_digest

MANIFEST_NAME = "manifest.json"
FORMAT = 1


def settings_hash(settings: dict) -> str:
    return json_digest(settings)


def manifest_path(zoo_dir: str | Path) -> Path:
    return Path(zoo_dir) / MANIFEST_NAME


def empty_manifest() -> dict:
    return {"format": FORMAT, "status": "building", "reasons": [], "models": {}}


def read_manifest(zoo_dir: str | Path) -> dict | None:
    """The manifest of a zoo folder, or None when there is none yet."""
    path = manifest_path(zoo_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}); rebuild with `tso zoo build --force`") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ValueError(f"{path}: not a zoo manifest (no 'models' mapping)")
    return data


def write_manifest(zoo_dir: str | Path, manifest: dict) -> Path:
    return atomic_write_text(manifest_path(zoo_dir), json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def format_table(manifest: dict) -> str:
    """The matrix as a text table: name, version, size, params, steps, held-out score, status."""
    headers = ["name", "version", "size", "params", "steps", "seen", "score", "exact", "time_s", "status"]
    rows = []
    base = manifest.get("base")
    models = sorted(manifest.get("models", {}).values(), key=lambda m: (m.get("version", 0), m.get("params", 0)))
    for m in models:
        tr = m.get("training", {})
        score = m.get("heldout_score")
        exact = m.get("heldout_exact")
        status = m.get("status", "")
        if m.get("name") == base:
            status += " (base)"
        rows.append([
            m.get("name", "?"), str(m.get("version", "?")), m.get("size_label", "?"),
            f"{m.get('params', 0) / 1e6:.3f}M", str(tr.get("total_steps", tr.get("steps", "?"))),
            str(tr.get("examples_seen", "?")),
            f"{score:.2f}" if isinstance(score, (int, float)) else "-",
            f"{exact:.0%}" if isinstance(exact, (int, float)) else "-",
            f"{m.get('build_seconds', 0):.0f}", status,
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    ev = manifest.get("eval", {})
    out.append("")
    out.append(
        f"matrix status: {manifest.get('status', '?')}; base {base}; held-out: {ev.get('prompts', '?')} "
        f"'eval' prompts, {ev.get('decoding', '?')} decoding; build {manifest.get('build_seconds', 0):.0f} s"
    )
    for r in manifest.get("reasons", []):
        out.append(f"  - {r}")
    return "\n".join(out)
