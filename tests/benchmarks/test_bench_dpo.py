"""benchmarks/bench_dpo.py --quick runs end to end and writes the JSON the full benchmark writes
(fields, ratios against the TRL baseline, machine info). No timing thresholds: speed is not tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_dpo_quick_writes_comparison_json(tmp_path):
    out = tmp_path / "dpo.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/bench_dpo.py", "--quick", "--threads", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads(out.read_text())
    assert report["mode"] == "quick" and report["baseline"] == "trl_tuned"
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["trl"] and report["machine"]["deepspeed"]
    s = report["settings"]
    assert s["steps"] == s["minibatches"] * s["epochs"] * s["steps_per_epoch"] and s["threads"] == 1
    configs = report["configurations"]
    assert set(configs) == {"tso_deepspeed", "tso_torch", "trl_tuned", "trl_ref_model"}
    for name, r in configs.items():
        for key in ("pairs_per_s", "pairs_per_s_steps_only", "tokens_per_s", "peak_rss_mib", "window_s",
                    "reference_time_s", "timed_steps", "precision"):
            assert key in r, (name, key)
        assert r["pairs_per_s"] > 0 and r["timed_steps"] == s["steps"] - s["warmup_steps"], name
        assert r["precision"] == "fp32", name
        # equal data: every configuration trains the same tokens per step
        assert r["tokens_per_step"] == configs["tso_deepspeed"]["tokens_per_step"], name
    assert configs["tso_deepspeed"]["reference_passes"] == s["minibatches"]  # one hot-swap pass per mini-batch
    assert configs["trl_tuned"]["precompute_ref_log_probs"] is True and configs["trl_tuned"]["reference_time_s"] > 0
    assert configs["trl_tuned"]["gradient_checkpointing"] is False
    assert configs["trl_ref_model"]["precompute_ref_log_probs"] is False
    assert configs["tso_deepspeed"]["engine"] == "deepspeed" and configs["tso_torch"]["engine"] == "torch"
    for name, r in configs.items():
        assert len(r["step_times_s"]) == r["timed_steps"] and r["pairs_per_s_p25_steps"] > 0, name
        assert r["window_s"] > 0 and all(t > 0 for t in r["step_times_s"]), name
        assert r["pairs_per_s"] <= r["pairs_per_s_steps_only"] * (1 + 1e-9), name  # reference work only adds time
    assert set(report["ratios_p25_steps"]) == set(report["ratios"])
    r = report["ratios"]["tso_deepspeed_vs_trl_tuned"]
    assert r == pytest.approx(configs["tso_deepspeed"]["pairs_per_s"] / configs["trl_tuned"]["pairs_per_s"])
