"""Files: atomic writes, digests, and where each step writes in a run directory.

Every artifact goes to a temporary name beside its target, is flushed to disk (fsync) and renamed into
place, and the rename is flushed too (fsync of the directory), so neither a killed step nor a power
loss leaves a half-written or empty file that a resumed run would trust. Files get the mode a plain
``open`` would give (temporary files and safetensors are created 0600). One process at a time writes
a run directory: ``run_dir_lock`` holds ``<run_dir>/.tso.lock`` while it does.

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
import socket
import tempfile
import time
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


# ----------------------------------------------------------------------------- durability


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk: a rename done after it can never expose an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory: the rename is then as durable as they allow
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Every file, then every directory, of a tree written to a temporary name (links are not followed)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            f = os.path.join(dirpath, name)
            if not os.path.islink(f):
                fsync_file(f)
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        fsync_dir(dirpath)


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
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
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
    after the swap, so a reader sees the old or the new directory, never a mix. The new tree is on
    disk before the rename and the rename is on disk before this returns."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
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
    fsync_dir(final.parent)


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


# ----------------------------------------------------------------------------- one writer per run directory

LOCK_FILE = ".tso.lock"
LOCK_WRITE_GRACE_S = 5.0  # an unreadable lock younger than this is still being written by its holder


class RunDirLocked(RuntimeError):
    """Another tso process writes this run directory (or may: its host cannot be checked from here)."""


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs with this pid (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def read_lock(lock: str | Path) -> dict | None:
    """The holder a lock file names, or None when it is missing, empty or unreadable."""
    try:
        data = json.loads(Path(lock).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def lock_holder(holder: dict) -> str:
    return (f"{holder.get('command') or 'a tso command'} (pid {holder.get('pid')} on host {holder.get('host')}, "
            f"started {holder.get('started')})")


def stale_reason(lock: Path, holder: dict | None, host: str) -> str | None:
    """Why a lock is stale and may be taken over, or None when its holder may be alive. Raises
    ``RunDirLocked`` for a holder on another host: its pid cannot be checked from here."""
    if holder is None:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        return f"an unreadable lock file {age:.0f} s old" if age > LOCK_WRITE_GRACE_S else None
    if holder.get("host") != host:
        raise RunDirLocked(
            f"{lock.parent} is locked by {lock_holder(holder)}; that host is not this one ({host}), so whether "
            f"the process still runs cannot be checked from here. If it no longer runs, delete {lock}")
    if not pid_alive(holder["pid"]):
        return f"pid {holder['pid']} of {lock_holder(holder)} is not running"
    return None


def _create_lock(lock: Path, record: dict) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(record, indent=2) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(lock.parent)
    return True


def _take_over(lock: Path, stale: dict | None) -> None:
    """Remove a stale lock, but only the one judged stale: a lock another process took over in
    between is put back."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return
    if read_lock(aside) != stale:
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path, what: str) -> Iterator[Path]:
    """Hold ``<run_dir>/.tso.lock`` (pid, host, start time, command) while writing a run directory, so
    two processes never write one at the same time. A lock of a dead process of this host is taken
    over with a note; a live holder, or one on another host, is a ``RunDirLocked`` error that says who
    holds it and how to clear it. The lock is removed on exit, also on an exception."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    host = socket.gethostname()
    mine = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": what}
    for _attempt in range(50):
        if _create_lock(lock, mine):
            break
        holder = read_lock(lock)
        reason = stale_reason(lock, holder, host)
        if reason is None and holder is not None:
            raise RunDirLocked(
                f"{run_dir} is in use by {lock_holder(holder)}: wait for it to finish or stop it. If no such "
                f"process runs (a pid reused since), delete {lock}")
        if reason is None:  # being written right now: read it again
            time.sleep(0.2)
            continue
        print(f"[tso] {lock}: taking over a stale lock ({reason})", flush=True)
        _take_over(lock, holder)
    else:
        raise RunDirLocked(f"could not take {lock}: it is unreadable and keeps changing; delete it if no tso "
                           "process writes this run directory")
    try:
        yield lock
    finally:
        if read_lock(lock) == mine:
            lock.unlink(missing_ok=True)


def lock_if_under(path: str | Path, run_dir: str | Path, what: str) -> contextlib.AbstractContextManager:
    """The run directory's lock when ``path`` lies inside it (a command writing its usual place), else
    nothing: a command told to write elsewhere does not block a run."""
    inside = Path(path).resolve().is_relative_to(Path(run_dir).resolve())
    return run_dir_lock(run_dir, what) if inside else contextlib.nullcontext()


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
