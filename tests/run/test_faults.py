"""Fault injection with real processes: replicas and drivers are killed with SIGKILL, broken files are fed in,
and tso must keep what it finished, redo only what was lost and end with the artifacts of an
uninterrupted run (pair formation is deterministic per seed, so its pairs are compared row for row).

One Serve app of tiny models (matrix a < b (base) < c, policy, an overfit tiny judge) serves the
module on 127.0.0.1:18450 under its own app name. Cases: kill -9 of a matrix model, the judge and the
policy replicas during pair formation; of the judge while evaluation scores (and answers saved before
scoring reused); the `tso pairs` driver killed mid-step and resumed from its per-batch journal (its stale
lock taken over); a broken checkpoint swapped into the policy; two writers on one run_dir; cut or empty
done-markers. A Ray Train worker killed mid-mini-batch is covered by
tests/train/test_ray.py::test_killed_worker_resumes_from_last_boundary_with_same_weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import JUDGE_RUBRICS, REPO, served_app, tiny_model_dirs, train_tiny_judge
from tso.config import dump_config, parse_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

PORT = 18450
APP = "tso-faults-test"
N_PROMPTS = 64
BATCH = 4  # prompts per batch: 16 journaled batches per step
TIMING_KEYS = ("seconds", "pairs_per_second", "generated_tokens_per_second")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
SUBPROCESS_ENV.pop("RAY_ADDRESS", None)  # the --local commands below must not join any cluster


# ----------------------------------------------------------------------------- models, config, app


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    dirs = {"a": str(tiny_model_dir),
            **tiny_model_dirs(tmp_path_factory.mktemp("fault-models"), tiny_tokenizer, {"b": 12, "c": 13})}
    dirs["judge"] = str(train_tiny_judge(tmp_path_factory.mktemp("judge"), tiny_tokenizer))
    return dirs


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fault-prompts") / "prompts.jsonl"
    rows = [{"id": f"p{i:03d}", "prompt": f"add {i} and {i + 1}", **({"human": str(2 * i + 1)} if i % 3 else {})}
            for i in range(N_PROMPTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fault-eval") / "eval.jsonl"
    path.write_text("".join(json.dumps({"id": f"e{i:03d}", "prompt": f"add {i} and {i}"}) + "\n"
                            for i in range(48)))
    return path


def _engine() -> dict:
    return {"kind": "transformers", "torch_threads": 1, "max_batch_size": 32, "batch_wait_timeout_s": 0.02}


def make_cfg(model_dirs, prompts_file, run_dir, eval_file=None, **pairs):
    res = {"num_cpus": 0.2, "max_ongoing_requests": 64}
    models = [{"name": "a", "version": 1, "size": 1}, {"name": "b", "version": 1, "size": 2},
              {"name": "c", "version": 1, "size": 4}]
    return parse_config({
        "name": "faults",
        "run_dir": str(run_dir),
        "seed": 7,
        "matrix": {"base": "b", "models": [
            {**m, "path": model_dirs[m["name"]], "engine": _engine(), "resources": res} for m in models]},
        "judge": {"path": model_dirs["judge"], "rubrics": JUDGE_RUBRICS, "engine": _engine(), "resources": res},
        # random models rarely stop within 6 tokens: keep their cut answers
        "pairs": {"prompts": str(prompts_file), "human_weight": 0.3, "n_self": 2, "truncated": "keep",
                  "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6}, **pairs},
        "eval": {"prompts": str(eval_file) if eval_file else None,
                 "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8}},
        # replicas killed below come back within seconds; a retry waits for them
        "serve": {"host": "127.0.0.1", "port": PORT, "app_name": APP, "ingress_replicas": 1,
                  "call_timeout_s": 120, "call_retries": 5},
    })


@pytest.fixture(scope="module")
def app(ray_cluster, model_dirs, prompts_file, eval_file, tmp_path_factory):
    cfg = make_cfg(model_dirs, prompts_file, tmp_path_factory.mktemp("run"), eval_file)
    with served_app(cfg, PORT):
        yield cfg


def _pairs(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(out / "pairs.parquet").to_pylist()}


def _untimed(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def reference(app, tmp_path_factory):
    """An uninterrupted pair step through Serve: what every interrupted one must end with."""
    from tso.pairs.pipeline import form_pairs_step

    out = tmp_path_factory.mktemp("reference")
    res = form_pairs_step(app, 1, out, app_name=APP, batch_size=BATCH, concurrency=2, progress=False)
    assert res["resumed_prompts"] == 0 and res["summary"]["prompts"] == N_PROMPTS
    return {"pairs": _pairs(out), "summary": res["summary"]}


# ----------------------------------------------------------------------------- replica processes


def replica(deployment: str, with_name: bool = False) -> tuple | None:
    """(actor id, pid) of the live replica of one of this app's deployments, and its actor name with
    ``with_name`` (from Ray's GCS: the state API may find several clusters on a shared machine)."""
    import ray

    cls = f"ServeReplica:{APP}:{deployment}"
    alive = [(aid, a["Pid"], a["Name"]) for aid, a in ray._private.state.actors().items()
             if a.get("ActorClassName") == cls and a.get("State") == "ALIVE" and a.get("Pid")]
    assert len(alive) <= 1, alive
    return None if not alive else alive[0] if with_name else alive[0][:2]


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def kill_when_busy(deployment: str, give_up, timeout: float = 120) -> tuple[int, int] | None:
    """SIGKILL a deployment's replica while handle calls are in flight on it: (pid, calls in flight), or
    None when ``give_up()`` came first. The replica counts its calls on a thread of its own, which
    answers while the engine generates."""
    import ray

    deadline = time.monotonic() + timeout
    while not give_up():
        assert time.monotonic() < deadline, f"no call reached {deployment} for {timeout:.0f} s"
        _, pid, name = replica(deployment, with_name=True)
        ongoing = ray.get(ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote(), timeout=30)
        if ongoing:
            kill(pid)
            return pid, ongoing
        time.sleep(0.01)
    return None


def retried_calls() -> Counter:
    """ServeClient's retries logged by this cluster's workers (the Ray Data actors), by deployment."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    found: Counter = Counter()
    for f in logs.glob("worker-*"):
        for line in f.read_text(errors="replace").splitlines():
            m = re.search(rf"(\S+)\.\w+ of app {APP}: attempt \d+ of \d+ failed \((\w+)\), retrying", line)
            if m:
                found[m.group(1)] += 1
    return found


class Killer(threading.Thread):
    """Kills each deployment's replica in turn while a pair step runs, each mid-batch: the first once a
    batch is journaled, each next one once the step journaled another batch after the previous kill (it
    got past it) and the killed replica was replaced."""

    def __init__(self, journal: Path, order: list[str]):
        super().__init__(daemon=True)
        self.journal, self.order = journal, order
        self.done = threading.Event()  # set when the step returned
        self.kills: list[dict] = []
        self.error: BaseException | None = None

    def batches(self) -> int:
        return len(list(self.journal.glob("batch-*.jsonl")))

    def run(self):
        try:
            seen = 0
            for deployment in self.order:
                wait_for(lambda seen=seen: self.done.is_set() or self.batches() > seen, 300,
                         f"a batch before killing {deployment}", every=0.02)
                killed = kill_when_busy(deployment, self.done.is_set)
                if killed is None:
                    return
                pid, ongoing = killed
                seen = self.batches()
                self.kills.append({"deployment": deployment, "pid": pid, "in_flight": ongoing, "batches": seen})
                wait_for(lambda d=deployment, old=pid: (r := replica(d)) and r[1] != old, 180, f"{deployment} restarted")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


# ----------------------------------------------------------------------------- 1. replicas killed during pairs


def test_replicas_killed_during_pair_formation_lose_no_prompt(app, reference, tmp_path):
    from tso.pairs.pipeline import form_pairs_step

    order = ["model-c", "judge", "policy"]
    before = {d: replica(d) for d in order}
    assert all(before.values()), before
    out = tmp_path / "pairs"
    retried_before = retried_calls()
    killer = Killer(out / ".journal", order)
    killer.start()
    try:
        res = form_pairs_step(app, 1, out, app_name=APP, batch_size=BATCH, concurrency=2, progress=False)
    finally:
        killer.done.set()
        killer.join(timeout=200)
    assert killer.error is None, killer.error
    retried = retried_calls() - retried_before
    total = N_PROMPTS // BATCH
    # every kill landed while the step ran (fewer batches journaled than it makes), one after the other
    assert [k["deployment"] for k in killer.kills] == order, killer.kills
    assert all(k["batches"] < total for k in killer.kills), killer.kills
    assert [k["pid"] for k in killer.kills] == [before[d][1] for d in order]
    # each killed replica had calls in flight, and the pair formers sent the killed calls again (a model's
    # short call may end between the count and the kill; a judge call, many prompts long, does not)
    assert all(k["in_flight"] > 0 for k in killer.kills) and retried["judge"] > 0, (retried, killer.kills)
    assert set(retried) <= set(order), retried  # nothing else failed
    for d in order:  # each was replaced by a new replica process
        now = replica(d)
        assert now and now[1] != before[d][1] and now[0] != before[d][0]
    s = res["summary"]
    assert s["prompts"] == N_PROMPTS and s["rejected_rows"] == 0 and s["rejects"] == {}
    assert s["failed_requests"] == {} and s["unscored_judge_answers"] == {}
    assert res["resumed_prompts"] == 0 and not (out / ".journal").exists()
    assert _pairs(out) == reference["pairs"]  # the same pairs as the uninterrupted run
    assert _untimed(s) == _untimed(reference["summary"])


# ----------------------------------------------------------------------------- 2. judge killed during evaluation


class Scoring:
    """A client passing calls through, failing the first ``fail`` score calls (a judge gone for good)."""

    def __init__(self, inner, fail: int = 0):
        self.inner, self.fail, self.calls = inner, fail, 0

    def generate(self, requests):
        return self.inner.generate(requests)

    def score(self, requests):
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise RuntimeError("judge unreachable (simulated)")
        return self.inner.score(requests)


def test_judge_killed_during_evaluation_scores_every_answer_and_reuses_saved_ones(app, tmp_path, caplog):
    from tso.run.evaluate import evaluate, evaluate_model, read_eval_rows
    from tso.serving.client import ServeClient

    base = app.matrix.entry("b").path
    out = tmp_path / "eval"
    out.mkdir()
    rows = read_eval_rows(app, out)
    client = ServeClient.from_config(app)

    # scoring fails after generation: the answers were saved first
    failing = Scoring(client, fail=1)
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate(app, {"base": base}, out, failing)
    saved = [json.loads(line) for line in (out / "base.generated.jsonl").read_text().splitlines()]
    assert [s["id"] for s in saved] == [r["id"] for r in rows] and failing.calls == 1
    assert all("text" in s["answer"] for s in saved) and not (out / "base.answers.jsonl").exists()

    # again, and the judge replica is killed while it scores: the call is sent again, every answer scored
    caplog.set_level(logging.WARNING, logger="tso.serving.client")
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(evaluate_model(app, "base", base, rows, out, client)), daemon=True)
    t.start()
    killed = kill_when_busy("judge", give_up=lambda: not t.is_alive())
    t.join(timeout=400)
    assert killed, "evaluation returned before the judge was killed"
    assert not t.is_alive() and result, "evaluate_model did not return"
    retries = [r.getMessage() for r in caplog.records if "judge.score_many" in r.getMessage() and "retrying" in r.getMessage()]
    assert retries, "the kill did not hit the scoring call"
    assert replica("judge")[1] != killed[0]
    assert result["generation_reused"] is True and result["resumed"] is False
    records = result["records"]
    assert [r["answer"] for r in records] == [s["answer"]["text"] for s in saved]  # not generated again
    # every answer scored, as an uninterrupted scoring of the same answers scores it (greedy judge)
    direct = client.score([{"prompt": r["prompt"], "response": s["answer"]["text"]} for r, s in zip(rows, saved)])
    assert [(r["judge"], r["judge_reason"]) for r in records] == [(d["score"], None) for d in direct]
    assert all(r["judge"] is not None for r in records)
    assert not (out / "base.generated.jsonl").exists()  # the answers file holds them now
    written = [json.loads(line) for line in (out / "base.answers.jsonl").read_text().splitlines()]
    assert [w["judge"] for w in written] == [r["judge"] for r in records] and len(written) == len(rows)


# ----------------------------------------------------------------------------- 3. the driver killed mid-step


def _tso(*args) -> list[str]:
    return [str(REPO / ".venv" / "bin" / "tso"), *args]


def test_pairs_driver_killed_mid_step_resumes_from_its_journal(app, reference, model_dirs, prompts_file, tmp_path):
    from tso.io import LOCK_FILE, pid_alive, read_lock

    run_dir = tmp_path / "run"
    cfg = make_cfg(model_dirs, prompts_file, run_dir)
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    out = run_dir / "stage-1" / "pairs"
    cmd = _tso("pairs", str(path), "--stage", "1", "--local", "--batch-size", str(BATCH))
    log = tmp_path / "first.log"
    with log.open("w") as f:
        first = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=SUBPROCESS_ENV)
    try:
        wait_for(lambda: first.poll() is not None or len(list((out / ".journal").glob("batch-*.jsonl"))) >= 2, 300,
                 "two journaled batches")
        assert first.poll() is None, f"finished before it could be killed:\n{log.read_text()[-3000:]}"
        kill(first.pid)
    finally:
        first.kill()
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    journaled = {json.loads(line)["id"] for p in (out / ".journal").glob("batch-*.jsonl")
                 for line in p.read_text().splitlines() if line.strip()}
    assert 0 < len(journaled) < N_PROMPTS and len(journaled) % BATCH == 0
    assert not (out / "summary.json").exists()
    stale = read_lock(run_dir / LOCK_FILE)  # the killed driver's lock is left behind
    assert stale["pid"] == first.pid and stale["host"] == socket.gethostname() and not pid_alive(first.pid)

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO, env=SUBPROCESS_ENV)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"taking over a stale lock (pid {first.pid} of tso pairs --stage 1" in again.stdout
    n = len(journaled)
    # only the prompts of unfinished batches were formed again
    assert (f"[pairs] stage 1: {n} of {N_PROMPTS} prompts formed before ({out / '.journal'}), "
            f"forming the other {N_PROMPTS - n}") in again.stdout, again.stdout[-3000:]
    assert _pairs(out) == reference["pairs"]
    summary = json.loads((out / "summary.json").read_text())
    assert _untimed(summary) == _untimed(reference["summary"])
    assert not (out / ".journal").exists() and not (run_dir / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- 4. a broken checkpoint swapped in


@pytest.fixture(scope="module")
def broken_checkpoints(model_dirs, tiny_tokenizer, tmp_path_factory):
    import shutil

    from tso.zoo.tiny import random_tiny_llama, save_model_dir

    root = tmp_path_factory.mktemp("broken")
    corrupt = root / "corrupt"
    shutil.copytree(model_dirs["b"], corrupt)
    weights = corrupt / "model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[: header + (len(data) - header) // 3])  # the header intact, the tensors cut short
    other = save_model_dir(random_tiny_llama(tiny_tokenizer, seed=3, hidden=32), tiny_tokenizer, root / "other-shape")
    return {"corrupt": str(corrupt), "other-shape": str(other)}


def test_a_broken_checkpoint_swapped_into_the_policy_keeps_the_old_weights_serving(app, broken_checkpoints):
    from tso.serving.app import deploy, served_checkpoints, swap_checkpoint
    from tso.serving.client import ServeClient

    client = ServeClient.from_config(app)
    request = {"prompt": [{"role": "user", "content": "a seeded prompt"}], "n": 2, "seed": 5, "temperature": 0.8,
               "top_p": 1.0, "max_new_tokens": 8}

    def policy():
        info = client.call([("policy", "info", (), {})])[0]
        return info, client.generate([("policy", request)])[0]

    served = served_checkpoints(app)
    info, answer = policy()
    process = replica("policy")
    assert info["load_error"] is None and info["checkpoint"] == served["policy"]
    reasons = {"corrupt": "incomplete metadata", "other-shape": "another architecture than the served"}
    try:
        for name, path in broken_checkpoints.items():
            with pytest.raises(RuntimeError, match=re.escape(f"still serves {served['policy']}, not {path}")):
                swap_checkpoint(app, path, port=PORT)
            now, again = policy()
            assert now["checkpoint"] == served["policy"] and now["weight_version"] == info["weight_version"]
            assert now["load_error"].startswith(f"{path}: ") and reasons[name] in now["load_error"], now["load_error"]
            assert again["texts"] == answer["texts"] and again["checkpoint"] == served["policy"]
            assert now["replica"] == info["replica"] and replica("policy") == process  # not restarted
    finally:
        deploy(app, checkpoints=served, port=PORT)  # the configured checkpoint back, for a replica that restarts
    now, again = policy()
    assert now["checkpoint"] == served["policy"] and now["load_error"] is None
    assert again["texts"] == answer["texts"] and replica("policy") == process


# ----------------------------------------------------------------------------- 5. two writers on one run_dir


HOLDER = """
import sys
from pathlib import Path

import tso.run.pipeline as pipeline
from tso.config import load_config_ref
from tso.io import atomic_write_json


def body(cfg, source, **kwargs):  # what `tso run` writes first, then a long step
    atomic_write_json(Path(cfg.run_dir) / "run.json", {"config_hash": cfg.config_hash(), "status": "running"})
    (Path(cfg.run_dir) / "stage-1").mkdir()
    (Path(cfg.run_dir) / "stage-1" / "work.txt").write_text("the first writer's work")
    print("holding", flush=True)
    sys.stdin.readline()


pipeline._run_pipeline = body
cfg, path = load_config_ref(sys.argv[1])
pipeline.run_pipeline(cfg, path)
"""


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_writer_is_refused_and_a_dead_writers_lock_taken_over(model_dirs, prompts_file, tmp_path, capsys,
                                                                      monkeypatch):
    import tso.run.pipeline as pipeline
    from tso.io import LOCK_FILE, RunDirLocked, pid_alive, read_lock

    run_dir = tmp_path / "run"
    cfg = make_cfg(model_dirs, prompts_file, run_dir)
    path = tmp_path / "first.yaml"
    path.write_text(dump_config(cfg))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO, env=SUBPROCESS_ENV)
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = _files(run_dir)
        assert read_lock(run_dir / LOCK_FILE)["pid"] == holder.pid and "stage-1/work.txt" in before
        with pytest.raises(RunDirLocked) as refused:
            pipeline.run_pipeline(cfg, "second.yaml")
        msg = str(refused.value)
        assert f"is in use by tso run {path} (pid {holder.pid} on host {socket.gethostname()}" in msg, msg
        assert _files(run_dir) == before  # the first writer's files untouched, nothing of the second written

        kill(holder.pid)  # the first writer dies holding the lock
        holder.wait(timeout=60)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert read_lock(run_dir / LOCK_FILE)["pid"] == holder.pid and not pid_alive(holder.pid)
    capsys.readouterr()
    monkeypatch.setattr(pipeline, "_run_pipeline", lambda cfg, source, **kw: read_lock(Path(cfg.run_dir) / LOCK_FILE))
    held = pipeline.run_pipeline(cfg, "second.yaml")
    assert held["pid"] == os.getpid() and held["command"] == "tso run second.yaml"
    assert f"taking over a stale lock (pid {holder.pid} of tso run {path}" in capsys.readouterr().out
    assert not (run_dir / LOCK_FILE).exists()  # released when the run returned
    assert {k: v for k, v in _files(run_dir).items() if k != LOCK_FILE} == {k: v for k, v in before.items()
                                                                              if k != LOCK_FILE}


# ----------------------------------------------------------------------------- 6. cut or empty done-markers


def test_cut_or_empty_pairs_markers_make_the_step_run_again(app, reference, tmp_path, capsys):
    from tso.run.pipeline import Timer, pairs_phase

    cfg = app.model_copy(deep=True)
    cfg.pairs.max_prompts = 12  # a prompt's pairs do not depend on the others: a subset of the reference's
    want = {k: v for k, v in reference["pairs"].items() if k in {f"p{i:03d}" for i in range(12)}}
    out = tmp_path / "pairs"
    pairs_phase(cfg, 1, out, Timer())
    assert _pairs(out) == want
    good = (out / "summary.json").read_text()

    for damage, why in ((lambda t: t[: len(t) // 2], "not valid JSON"), (lambda t: "", "empty")):
        (out / "summary.json").write_text(damage(good))
        (out / "pairs.parquet").write_bytes(b"")  # whatever was there is rewritten too
        capsys.readouterr()
        pairs_phase(cfg, 1, out, Timer())
        log = capsys.readouterr().out
        assert f"{out / 'summary.json'}: not trusted as a done-marker ({why}" in log
        assert ">>> stage 1: pair formation" in log and "done before" not in log
        summary = json.loads((out / "summary.json").read_text())
        assert _untimed(summary) == _untimed(json.loads(good)) and _pairs(out) == want

    stamp = {p: (out / p).stat().st_mtime_ns for p in ("summary.json", "pairs.parquet")}
    capsys.readouterr()
    pairs_phase(cfg, 1, out, Timer())  # a good marker is trusted: nothing is formed again
    log = capsys.readouterr().out
    assert "done before" in log and "pair formation" not in log
    assert {p: (out / p).stat().st_mtime_ns for p in stamp} == stamp


def test_a_cut_lineage_marker_makes_training_run_again(tmp_path, model_dirs, prompts_file, capsys, monkeypatch):
    """Which marker decides is the point here (training itself resumes in tests/train/test_ray.py): a
    stand-in for train_policy writes what it writes and counts its calls."""
    import shutil

    import tso.train.ray_trainer as ray_trainer
    from tso.io import atomic_write_json
    from tso.run.pipeline import Timer, training_phase

    cfg = make_cfg(model_dirs, prompts_file, tmp_path / "run")
    calls = []

    def train_policy(cfg, pairs, base_path, out_dir, stage):
        calls.append(stage)
        policy = Path(out_dir) / "policy"
        shutil.rmtree(policy, ignore_errors=True)
        shutil.copytree(base_path, policy)
        atomic_write_json(policy / "lineage.json", {"kind": "policy", "stage": stage, "base": base_path})
        atomic_write_json(Path(out_dir) / "summary.json", {"policy_dir": str(policy), "steps": 3})
        return type("Result", (), {"policy_dir": str(policy)})()

    monkeypatch.setattr(ray_trainer, "train_policy", train_policy)
    out = tmp_path / "train"
    base = model_dirs["b"]
    assert training_phase(cfg, 1, tmp_path / "pairs.parquet", base, out, Timer()) == str(out / "policy")
    assert calls == [1]
    lineage = out / "policy" / "lineage.json"
    good = lineage.read_text()
    lineage.write_text(good[: len(good) // 2])
    capsys.readouterr()
    training_phase(cfg, 1, tmp_path / "pairs.parquet", base, out, Timer())
    assert calls == [1, 1] and lineage.read_text() == good  # done again, the marker rewritten
    assert f"{lineage}: not trusted as a done-marker (not valid JSON" in capsys.readouterr().out
    training_phase(cfg, 1, tmp_path / "pairs.parquet", base, out, Timer())
    assert calls == [1, 1] and "done before" in capsys.readouterr().out
