"""The pair-formation benchmark's quick mode runs end to end (so the script cannot rot)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.timeout(600)
def test_bench_pairs_quick(tmp_path):
    out = tmp_path / "pairs.json"
    script = REPO / "benchmarks" / "bench_pairs.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--port", "18402", "--out", str(out)],
                          capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["baseline"]["pairs"] == res["pipeline"]["pairs"] == 8
    assert res["identical_pairs"] is True  # same keyed seeds: Ray and no-Ray give the same pairs
    assert res["ratio_pipeline_over_baseline_seconds"] > 0 and res["machine"]["ray"]
