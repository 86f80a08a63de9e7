"""Done-markers a resumed run trusts only when they parse and agree with the artifacts they stand for.

A step is skipped on resume when its marker says it finished. A marker that is empty, cut short,
unparseable, missing a key, or that disagrees with its artifact (a pairs count that is not the
Parquet file's row count, a policy without weights) is not trusted: the step is done again and its
outputs are rewritten atomically. Each untrusted marker prints one line saying why.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def untrusted(path: Path, why: str) -> None:
    print(f"[tso] {path}: not trusted as a done-marker ({why}); the step is done again", flush=True)


def read_json_marker(path: str | Path, required_keys: tuple[str, ...] = ()) -> dict | None:
    """The marker's JSON object, or None when it is missing, empty, truncated, unparseable, not an
    object or lacks one of ``required_keys`` (a missing marker is the usual not-done and says nothing)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        untrusted(path, f"unreadable: {e}")
        return None
    if not text.strip():
        untrusted(path, "empty")
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        untrusted(path, f"not valid JSON, truncated? {e}")
        return None
    if not isinstance(data, dict):
        untrusted(path, f"a JSON {type(data).__name__}, not an object")
        return None
    missing = [k for k in required_keys if k not in data]
    if missing:
        untrusted(path, f"lacks {', '.join(missing)}")
        return None
    return data


def parquet_rows(path: Path) -> int | None:
    """Rows of a Parquet file that reads (its first column, read whole), or None (with the reason
    printed) when it does not."""
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        return f.read(columns=f.schema_arrow.names[:1]).num_rows
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - any unreadable file is simply not done
        untrusted(path, f"unreadable Parquet: {e}")
        return None


def weights_present(model_dir: Path) -> bool:
    """A non-empty weights file, or an index whose shards are all there."""
    for name in WEIGHT_FILES:
        f = model_dir / name
        if f.is_file() and f.stat().st_size > 0:
            return True
    for name in WEIGHT_INDEXES:
        index = read_json_marker(model_dir / name, ("weight_map",))
        if index is not None:
            shards = set(index["weight_map"].values())
            return bool(shards) and all((model_dir / s).is_file() for s in shards)
    return False


def pairs_done(out_dir: str | Path) -> bool:
    """``summary.json`` with a ``pairs`` count, and ``pairs.parquet`` readable with that many rows."""
    out_dir = Path(out_dir)
    summary = read_json_marker(out_dir / "summary.json", ("pairs",))
    if summary is None:
        return False
    rows = parquet_rows(out_dir / "pairs.parquet")
    if rows is None:
        if not (out_dir / "pairs.parquet").exists():
            untrusted(out_dir / "summary.json", "pairs.parquet is missing")
        return False
    if rows != summary["pairs"]:
        untrusted(out_dir / "summary.json", f"it counts {summary['pairs']} pairs, pairs.parquet holds {rows} rows")
        return False
    return True


def model_done(model_dir: Path, marker: str, required_keys: tuple[str, ...] = ()) -> bool:
    """A model directory whose ``marker`` file parses and whose weights are there."""
    if read_json_marker(model_dir / marker, required_keys) is None:
        return False
    if not weights_present(model_dir):
        untrusted(model_dir / marker, f"no weights file in {model_dir}")
        return False
    return True


def judge_done(judge: str | Path, work: str | Path) -> bool:
    """The judge: ``config.json`` parses, its weights are there, and ``judge_train/summary.json`` is valid."""
    return (model_done(Path(judge), "config.json")
            and read_json_marker(Path(work) / "summary.json", ("judge_dir", "steps")) is not None)


def training_done(out_dir: str | Path) -> bool:
    """A stage's training: ``policy/lineage.json`` and ``summary.json`` valid, the policy's weights there."""
    out_dir = Path(out_dir)
    return (model_done(out_dir / "policy", "lineage.json", ("kind", "stage"))
            and read_json_marker(out_dir / "summary.json", ("policy_dir", "steps")) is not None)
