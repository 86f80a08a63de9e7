"""Files: atomic writes, digests, and where each step writes in a run directory.

Every artifact goes to a temporary name beside its target and is renamed into place, so a killed
step never leaves a half-written file that a resumed run would trust. Files get the mode a plain
``open`` would give (temporary files and safetensors are created 0600).

Run-directory layout (every command writes the same one; ``tso run`` reads and resumes it)::

    <run_dir>/stage-<t>/pairs/     pairs.parquet, summary.json, rejects.jsonl   (tso pairs)
    <run_dir>/stage-<t>/train/     policy/, metrics.jsonl, training.png, ...    (tso train)
    <run_dir>/judge/, judge_train/ the corrected judge and its training files   (tso train-judge)
    <run_dir>/baselines/<name>/    the same layout for each baseline
    <run_dir>/eval/                answers and summaries per evaluated model
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# ----------------------------------------------------------------------------- modes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def respect_umask(path: Path) -> None:
    """Give a file (or a directory's files) the mode a plain ``open`` would give."""
    mode = 0o666 & ~_umask()
    for f in (path.iterdir() if path.is_dir() else [path]):
        if f.is_file():
            os.chmod(f, mode)


# ----------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        respect_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def atomic_write_parquet(path: str | Path, rows: list[dict], schema=None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_file(path, ".parquet") as tmp:
        table = pa.Table.from_pylist(rows, schema=schema) if rows or schema is None else schema.empty_table()
        pq.write_table(table, tmp)
    return Path(path)


# ----------------------------------------------------------------------------- atomic directories


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move a finished directory onto ``final``; an older one is moved aside first and removed only
    after the swap, so a reader sees the old or the new directory, never a mix."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, old / final.name)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old / final.name, final)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        respect_umask(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- digests


def json_digest(obj, length: int = 16) -> str:
    """A short, stable digest of a JSON-able object (keys sorted): identifies settings and configs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the run directory


def stage_dir(run_dir: str | Path, stage: int) -> Path:
    return Path(run_dir) / f"stage-{stage}"


def pairs_dir(run_dir: str | Path, stage: int) -> Path:
    return stage_dir(run_dir, stage) / "pairs"


def train_dir(run_dir: str | Path, stage: int) -> Path:
    return stage_dir(run_dir, stage) / "train"


def legacy_train_dir(run_dir: str | Path, stage: int) -> Path:
    """Where `tso train` wrote before every command shared one layout."""
    return Path(run_dir) / "train" / f"stage{stage}"


def judge_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "judge"


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval"


def baseline_run_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "baselines" / name
