"""The serving benchmark's quick mode runs end to end and writes the JSON it promises (no timing
thresholds: speed is reported, not asserted)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

BENCH = REPO / "benchmarks" / "bench_serving.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_serving", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_writes_both_configurations_and_the_ratio(ray_cluster, tmp_path):
    bench = _load_bench()
    out = tmp_path / "serving.json"
    result = bench.main(["--quick", "--clients", "1,8", "--port", "18171", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["ray"] and data["machine"]["torch"]
    assert data["baseline"] == "batching_off" and data["quick"] is True
    on, off = data["configurations"]["batching_on"], data["configurations"]["batching_off"]
    assert on["max_batch_size"] == 32 and off["max_batch_size"] == 1
    for conf in (on, off):
        assert set(conf["levels"]) == {"1", "8"}
        for level in conf["levels"].values():
            assert level["errors"] == 0 and level["requests"] >= 8
            assert level["throughput_rps"] > 0 and 0 < level["latency_p50_ms"] <= level["latency_p99_ms"]
            assert {"judge", "ingress", "proxy", "load_generator_and_driver"} <= set(level["cpu_ms_per_request"])
            assert level["cpu_ms_per_request"]["judge"] > 0  # the judge really generated
    assert off["levels"]["8"]["judge_max_batch_rows"] == 1  # batch size 1 really is 1
    assert on["levels"]["8"]["judge_max_batch_rows"] > 1  # and batching really batches under load
    assert data["ratio_clients"] == 8
    ratio = on["levels"]["8"]["throughput_rps"] / off["levels"]["8"]["throughput_rps"]
    assert data["ratio_on_over_off"] == pytest.approx(ratio, rel=1e-3)
    assert data["meets_target"] == (data["ratio_on_over_off"] >= data["target_ratio"])
