"""benchmarks/bench_engines.py --quick runs end to end in the vLLM tier and writes the JSON the full
benchmark writes (the ratio, both engines' pair formation, evaluation, start and swap times)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1500)]
pytest.importorskip("vllm")


def test_bench_engines_quick_writes_the_ratio(smollm2_home, tmp_path):
    out = tmp_path / "engines.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_engines.py", "--quick", "--home", str(smollm2_home),
                           "--out", str(out)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads(out.read_text())
    assert report["mode"] == "quick" and report["ratio_vllm_over_transformers"] > 0 and report["machine"]["vllm"]
    for kind in ("transformers", "vllm"):
        e = report["engines"][kind]
        assert e["pairs"] > 0 and e["generated_tokens"] > 0 and e["eval_answers"] == 2 * 2
        assert e["start_s"] > 0 and e["swap_s"] > 0
