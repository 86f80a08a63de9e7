"""tso.io: atomic writes that leave the old file or the new one (never a temporary one), and the run
directory's lock, held and refused across real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tso.io import (
    LOCK_FILE,
    RunDirLocked,
    atomic_dir,
    atomic_file,
    atomic_write_json,
    lock_if_under,
    pid_alive,
    read_lock,
    run_dir_lock,
)

pytestmark = pytest.mark.timeout(120)

HOLD = """
import sys
from tso.io import run_dir_lock
with run_dir_lock(sys.argv[1], "tso run held-by-test"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


class Holder:
    """A real second process holding the lock until ``release``."""

    def __init__(self, run_dir: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        assert line.strip() == "held", self.proc.stderr.read()

    def release(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(timeout=60)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_file_renames_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "marker.json"
    atomic_write_json(target, {"pairs": 3})
    assert json.loads(target.read_text()) == {"pairs": 3} and _files(target.parent) == ["marker.json"]
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text('{"pairs": 4, "cut')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"pairs": 3} and _files(target.parent) == ["marker.json"]


def test_atomic_dir_replaces_a_whole_tree_links_included(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "nested").mkdir()
        (tmp / "nested" / "w.bin").write_bytes(b"\x00" * 10)
        (tmp / "link").symlink_to(tmp_path / "nowhere")  # a dangling link is neither followed nor synced
    assert _files(final) == ["link", "nested"] and (final / "nested" / "w.bin").stat().st_size == 10
    assert _files(tmp_path) == ["model"]  # no temporary or moved-aside directory left


# ----------------------------------------------------------------------------- the lock


def test_lock_held_by_a_live_process_is_refused_with_its_pid_host_and_start(tmp_path):
    holder = Holder(tmp_path)
    try:
        record = read_lock(tmp_path / LOCK_FILE)
        assert record["pid"] == holder.proc.pid and record["host"] == socket.gethostname()
        assert record["command"] == "tso run held-by-test" and record["started"]
        with pytest.raises(RunDirLocked) as e, run_dir_lock(tmp_path, "second"):
            pass
        msg = str(e.value)
        for part in (f"pid {holder.proc.pid}", f"on host {socket.gethostname()}", f"started {record['started']}",
                     "tso run held-by-test", f"delete {tmp_path / LOCK_FILE}"):
            assert part in msg, (part, msg)
        assert read_lock(tmp_path / LOCK_FILE) == record  # the refused caller left it alone
    finally:
        assert holder.release() == 0
    assert not (tmp_path / LOCK_FILE).exists()  # released on exit
    with run_dir_lock(tmp_path, "after"):
        assert read_lock(tmp_path / LOCK_FILE)["pid"] == os.getpid()


def test_tso_train_refuses_a_run_dir_another_process_holds(tmp_path, tiny_model_dir):
    import yaml

    run_dir = tmp_path / "run"
    models = [{"name": "base", "path": str(tiny_model_dir), "version": 0, "size": 1},
              {"name": "small", "path": str(tiny_model_dir), "version": 0, "size": 0.5}]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run_dir), "matrix": {"base": "base", "models": models}}))
    holder = Holder(run_dir)
    try:
        proc = subprocess.run([sys.executable, "-m", "tso.cli", "train", str(cfg), "--pairs", str(tmp_path / "p.parquet"),
                               "--local"], capture_output=True, text=True, timeout=120, cwd=REPO)
    finally:
        holder.release()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"is in use by tso run held-by-test (pid {holder.proc.pid}" in proc.stderr
    assert not (run_dir / "stage-1").exists()  # refused before writing anything


def test_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    pid = _dead_pid()
    assert not pid_alive(pid)
    stale = {"pid": pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00+0000", "command": "tso run x"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    with run_dir_lock(tmp_path, "tso run y") as lock:
        held = read_lock(lock)
        assert held["pid"] == os.getpid() and held["command"] == "tso run y"
    assert f"taking over a stale lock (pid {pid} of tso run x" in capsys.readouterr().out
    assert _files(tmp_path) == []


def test_an_empty_lock_left_by_a_crash_is_taken_over_once_old(tmp_path, capsys):
    lock = tmp_path / LOCK_FILE
    lock.write_text("")
    old = time.time() - 60
    os.utime(lock, (old, old))
    with run_dir_lock(tmp_path, "tso run z"):
        assert read_lock(lock)["pid"] == os.getpid()
    assert "an unreadable lock file 60 s old" in capsys.readouterr().out


def test_lock_from_another_host_is_refused_and_kept(tmp_path):
    other = {"pid": 1, "host": "other-node.invalid", "started": "2024-05-01T10:00:00+0000", "command": "tso run a"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(RunDirLocked) as e, run_dir_lock(tmp_path, "tso run b"):
        pass
    msg = str(e.value)
    assert "pid 1 on host other-node.invalid, started 2024-05-01T10:00:00+0000" in msg
    assert "cannot be checked" in msg and f"delete {tmp_path / LOCK_FILE}" in msg
    assert read_lock(tmp_path / LOCK_FILE) == other


def test_lock_is_released_when_the_body_raises(tmp_path):
    with pytest.raises(KeyError), run_dir_lock(tmp_path, "tso run"):
        assert (tmp_path / LOCK_FILE).is_file()
        raise KeyError("boom")
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_zombie_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.05)
    assert not pid_alive(proc.pid)  # exited, not reaped yet: os.kill(pid, 0) alone would say alive
    proc.wait()
    assert pid_alive(os.getpid())


def test_commands_lock_only_inside_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    with lock_if_under(tmp_path / "elsewhere" / "pairs", run_dir, "tso pairs"):
        assert not (run_dir / LOCK_FILE).exists()
    with lock_if_under(run_dir / "stage-1" / "pairs", run_dir, "tso pairs"):
        assert read_lock(run_dir / LOCK_FILE)["command"] == "tso pairs"
    assert not (run_dir / LOCK_FILE).exists()
