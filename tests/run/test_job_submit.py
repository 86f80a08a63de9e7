"""The full pipeline as users run it: `ray job submit -- tso run CONFIG` against a local head node.

A micro run (fixture matrix, 2 stages, a dozen prompts) is submitted, stopped with `ray job stop`
(which kills the driver) once stage 1's pairs exist, and submitted again: the second job must
resume without regenerating those pairs and finish with every artifact, checked by content.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.last]

BIN = Path(sys.executable).parent
GCS_PORT, DASH_PORT, SERVE_PORT = 6391, 8291, 18501
ADDRESS = f"http://127.0.0.1:{DASH_PORT}"


def _env(home: Path) -> dict:
    # RAY_AUTH_MODE=token: the head and the job CLI agree on Ray's token authentication (~/.ray/auth_token).
    env = dict(os.environ, TSO_HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}", RAY_ADDRESS=ADDRESS,
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="token")
    return env


def _ray(*args, env, timeout=300, check=True):
    proc = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _take(src: Path, dst: Path, n: int) -> Path:
    lines = src.read_text().splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n")
    return dst


def micro_config(home: Path, run_dir: Path) -> dict:
    from tso.zoo.build import build_fixture_matrix, fixture_matrix_section
    from tso.zoo.data import data_dir, write_feedback, write_prompts

    build_fixture_matrix(home)
    data = data_dir(home)
    write_prompts(data, n_train=10, n_pref=40, n_eval=40)
    write_feedback(home, data, n_train=96, n_eval=10, use_models=False)
    engine = {"kind": "transformers", "torch_threads": 1, "max_batch_size": 32, "batch_wait_timeout_s": 0.02}
    res = {"num_cpus": 0.1, "max_ongoing_requests": 64}
    matrix = fixture_matrix_section(home)
    for m in matrix["models"]:
        m.update(engine=engine, resources=res)
    return {
        "name": "micro", "run_dir": str(run_dir), "seed": 5, "stages": 2,
        "matrix": matrix,
        "judge": {"feedback": str(data / "feedback_train.jsonl"), "engine": engine, "resources": res,
                  "held_out": str(data / "feedback_eval.jsonl"), "held_out_max": 24,
                  "sampling": {"temperature": 0.0, "max_new_tokens": 40},
                  "train": {"lr": 2e-3, "epochs": 1, "global_batch": 16, "micro_batch": 8}},
        # the fixture's models are barely trained and rarely stop within 12 tokens: keep their cut answers
        "pairs": {"prompts": str(_take(data / "prompts_pref.jsonl", run_dir.parent / "pref.jsonl", 12)), "n_self": 2,
                  "truncated": "keep", "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 12}},
        "train": {"minibatches": 2, "epochs": 1, "global_batch": 4, "micro_batch": 4, "num_workers": 1,
                  "optimizer": {"lr": 1e-3, "warmup_ratio": 0.0}, "loss": {"type": "dual_clip"}},
        "eval": {"prompts": str(_take(data / "prompts_eval.jsonl", run_dir.parent / "eval.jsonl", 8)),
                 "verifier": "toyworld", "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 12}},
        "serve": {"port": SERVE_PORT, "app_name": "tso-micro"},
    }


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node of its own (`ray start --head`). `ray stop` stops every Ray cluster on the machine,
    so this module runs last (marker `last`, ordered in conftest.py) and leaves the session's first."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    home = tmp_path_factory.mktemp("home")
    env = _env(home)
    _ray("start", "--head", f"--port={GCS_PORT}", f"--dashboard-port={DASH_PORT}", "--num-cpus=8",
         "--include-dashboard=true", "--disable-usage-stats", env=env)
    try:
        yield home, env
    finally:
        _ray("stop", "--force", env=env, check=False)


def _submit(env, cfg_path: Path, wait: bool) -> str:
    args = ["job", "submit", f"--address={ADDRESS}", f"--working-dir={REPO}",
            "--runtime-env-json", json.dumps({"env_vars": {"TSO_HOME": env["TSO_HOME"], "OMP_NUM_THREADS": "1"}})]
    if not wait:
        args.append("--no-wait")
    for _ in range(60):  # right after `ray start` the job agent may not be up yet
        proc = _ray(*args, "--", "tso", "run", str(cfg_path), env=env, timeout=1500, check=False)
        out = proc.stdout + proc.stderr
        if "No available agent" not in out and "Connection refused" not in out:
            break
        time.sleep(2)
    job_id = next((w.strip("'\"") for w in out.split() if w.strip("'\"").startswith("raysubmit_")), None)
    assert job_id, out[-3000:]
    return job_id


def _status(env, job_id: str) -> str:
    out = _ray("job", "status", f"--address={ADDRESS}", job_id, env=env).stdout.lower()
    for state in ("succeeded", "failed", "stopped", "running", "pending"):
        if state in out:
            return state.upper()
    return out


@pytest.mark.timeout(1800)
def test_ray_job_submit_micro_run_resumes_after_the_driver_is_killed(head, tmp_path):
    home, env = head
    run_dir = tmp_path / "run"
    cfg_path = tmp_path / "micro.yaml"
    cfg_path.write_text(yaml.safe_dump(micro_config(home, run_dir)))
    pairs1 = run_dir / "stage-1" / "pairs" / "summary.json"

    job = _submit(env, cfg_path, wait=False)
    deadline = time.time() + 900
    while not pairs1.exists():
        state = _status(env, job)
        assert state in ("RUNNING", "PENDING"), _ray("job", "logs", f"--address={ADDRESS}", job, env=env).stdout[-5000:]
        assert time.time() < deadline, "stage 1 pairs never appeared"
        time.sleep(2)
    _ray("job", "stop", f"--address={ADDRESS}", job, env=env)
    while _status(env, job) in ("RUNNING", "PENDING"):
        time.sleep(1)
    stamp = (run_dir / "stage-1" / "pairs" / "pairs.parquet").stat().st_mtime_ns

    job2 = _submit(env, cfg_path, wait=True)
    logs = _ray("job", "logs", f"--address={ADDRESS}", job2, env=env).stdout
    assert _status(env, job2) == "SUCCEEDED", logs[-6000:]
    assert "stage 1 pairs: done before" in logs
    assert "judge quality: measured before" in logs  # the second driver did not measure the judge again
    assert (run_dir / "stage-1" / "pairs" / "pairs.parquet").stat().st_mtime_ns == stamp

    # every artifact, by content
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "done" and len(meta["policies"]) == 2
    assert (run_dir / "judge" / "config.json").is_file()
    # the judge's quality: the run's judge and the uncorrected base on the same held-out records
    quality = json.loads((run_dir / "judge_quality.json").read_text())
    assert quality["records"] == 24 and quality["dimensions"] == ["conciseness", "correctness"]
    assert quality["judge_path"] == str(run_dir / "judge") and quality["base_path"] == str(home / "zoo" / "v2-m")
    for side in ("judge", "base"):
        assert quality[side]["n"] == 24 and 0 <= quality[side]["parse_rate"] <= 1
    for side in ("judge", "base"):  # an answer without a score is a miss, counted by reason, never a number
        unscored = sum(quality[side]["unscored_reasons"].values())
        assert quality[side]["parse_rate"] == pytest.approx(1 - unscored / 24)
    # the length-only floor, recomputed from the same held-out records (the same fixed sample)
    from tso.run.judge_quality import length_only, read_held_out, spread

    records = spread(read_held_out(home / "data" / "feedback_eval.jsonl")[0], 24)
    floor = length_only(records, [r["score"] for r in records], [r["dimension"] for r in records])
    assert quality["length_only"] == floor and set(floor["spearman_per_dimension"]) == {"conciseness", "correctness"}
    assert meta["judge"]["quality"] == {"records": 24, "holds": quality["rule"]["holds"]}
    judge_summary = json.loads((run_dir / "judge_train" / "summary.json").read_text())
    assert judge_summary["quality"]["judge"] == quality["judge"]
    for t in (1, 2):
        rows = pq.read_table(run_dir / f"stage-{t}" / "pairs" / "pairs.parquet").to_pylist()
        assert rows and all(r["chosen_source"] and r["rejected_source"] and r["stage"] == t for r in rows)
        records = [json.loads(x) for x in (run_dir / f"stage-{t}" / "train" / "metrics.jsonl").read_text().splitlines()]
        boundaries = {r.get("minibatch") for r in records if r.get("minibatch") is not None}
        assert boundaries == {1, 2}, boundaries  # K = 2 mini-batches
        lineage = json.loads((run_dir / f"stage-{t}" / "train" / "policy" / "lineage.json").read_text())
        assert lineage["stage"] == t
    # stage 2's matrix holds the stage-1 policy as a negative source
    s2 = json.loads((run_dir / "stage-2" / "pairs" / "summary.json").read_text())
    assert "tso-1" not in s2["drawn_sources"]["positive"]
    from safetensors.torch import load_file

    base = load_file(str(home / "zoo" / "v2-m" / "model.safetensors"))
    tuned = load_file(str(run_dir / "stage-2" / "train" / "policy" / "model.safetensors"))
    assert any(not (base[k] == tuned[k]).all() for k in base if k in tuned)
    report = (run_dir / "report.md").read_text()
    for label in ("base", "tso-1", "tso-2"):
        assert f"| {label} |" in report
    assert "Judge quality on 24 held-out feedback records" in report and "| uncorrected base |" in report
    evals = {json.loads(p.read_text())["label"]: json.loads(p.read_text()) for p in (run_dir / "eval").glob("*.json")}
    assert set(evals) == {"base", "tso-1", "tso-2"} and all(e["n"] == 8 for e in evals.values())
    assert all(2 <= e["verifier_mean"] <= 10 for e in evals.values())
    assert all(set(e["verifier_dimensions"]) == {"correctness", "conciseness"} for e in evals.values())
    shutil.rmtree(run_dir / "stage-1" / "train" / "ray", ignore_errors=True)
