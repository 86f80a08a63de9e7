"""Evaluation summaries and the run report, on hand-made records (no cluster): the numbers in the
tables are the ones computed from the answers, and the verdict states what the numbers say."""

from __future__ import annotations

import json
import math

import pytest

from tso.run.evaluate import summarize_model
from tso.run.report import write_report


def _records(label: str, verifier: list[float], judge: list[float | None]) -> list[dict]:
    return [{"label": label, "path": f"/m/{label}", "id": str(i), "family": "add" if i % 2 else "sort",
             "answer": "x", "judge": j, "judge_reason": None if j is not None else "no_score", "verifier": v,
             "verifier_dimensions": {"correctness": v, "conciseness": 10.0 - i}}
            for i, (v, j) in enumerate(zip(verifier, judge))]


def test_summary_means_standard_errors_and_win_rate():
    base = _records("base", [4, 6, 8, 2], [5, 5, 5, 5])
    model = _records("m", [6, 6, 2, 10], [6, None, 4, 8])
    s = summarize_model(model, base)
    assert s["verifier_mean"] == pytest.approx(6.0) and s["judge_mean"] == pytest.approx(6.0)
    # sample std of (6, 6, 2, 10) is sqrt(32/3); s.e. = that / 2
    assert s["verifier_se"] == pytest.approx(math.sqrt(32 / 3) / 2)
    assert s["judge_se"] == pytest.approx(2 / math.sqrt(3))  # (6, 4, 8): the unscored answer is left out
    assert s["judge_unscored"] == 1 and s["win_rate_key"] == "verifier"
    assert s["win_rate_vs_base"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # win, tie, loss, win
    assert s["per_family"] == {"add": pytest.approx(8.0), "sort": pytest.approx(4.0)}
    assert s["verifier_dimensions"] == {"correctness": pytest.approx(6.0), "conciseness": pytest.approx(8.5)}
    assert summarize_model(_records("one", [5], [None]), None)["verifier_se"] is None


def _write_eval(run_dir, label, verifier):
    s = {"label": label, "path": f"/m/{label}", **summarize_model(_records(label, verifier, verifier), None)}
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / f"{label}.json").write_text(json.dumps(s))


def test_report_tables_plot_and_verdict(tmp_path):
    for label, v in (("base", [4, 5]), ("dpo", [5, 6]), ("tso-1", [5, 5]), ("tso-2", [6, 6]), ("tso-3", [5, 6])):
        _write_eval(tmp_path, label, v)
    for stage_dir in (tmp_path / "stage-1", tmp_path / "baselines" / "dpo" / "stage-1"):
        (stage_dir / "pairs").mkdir(parents=True)
        (stage_dir / "pairs" / "summary.json").write_text(json.dumps({"pairs": 7, "pair_kinds": {"matrix": 7}}))
    (tmp_path / "run.json").write_text(json.dumps({"name": "r", "timings": {"judge": 1.5}}))
    text = write_report(tmp_path).read_text()
    assert "| tso-2 | 6.00 ± 0.00 |" in text and "| base | 4.50 ± 0.50 |" in text
    assert text.index("| base |") < text.index("| dpo |") < text.index("| tso-1 |") < text.index("| tso-3 |")
    assert "rise monotonically on ground truth: **no** (5.000, 6.000, 5.500)" in text
    assert "above base on ground truth: **yes** (5.500 vs 4.500)" in text
    assert "above dpo on ground truth: **no** (5.500 vs 5.500)" in text
    assert "| model | correctness | conciseness |" in text and "| tso-2 | 6.00 | 9.50 |" in text
    assert "| stage-1 | 7 | matrix 7 |" in text and "| baselines/dpo/stage-1 | 7 |" in text
    assert (tmp_path / "eval.png").stat().st_size > 1000 and "![held-out evaluation](eval.png)" in text
    assert "| judge | 1.5 |" in text


def test_report_without_a_verifier_claims_no_ground_truth(tmp_path):
    """No verifier: no verifier columns or dimension tables, win rates and the verdict on the judge's
    scores (said so), the judge described from run.json and its parse rate per step."""
    base = [dict(r, verifier=None, verifier_dimensions=None, finish_reason="stop")
            for r in _records("base", [0, 0, 0, 0], [5, 5, None, 5])]
    tso = [dict(r, verifier=None, verifier_dimensions=None, finish_reason=f) for r, f in
           zip(_records("tso-1", [0, 0, 0, 0], [6, 4, 7, None]), ("stop", "stop", "length", "stop"))]
    (tmp_path / "eval").mkdir()
    for label, recs, ref in (("base", base, None), ("tso-1", tso, base)):
        s = {"label": label, "path": f"/m/{label}", **summarize_model(recs, ref, verifier=False)}
        (tmp_path / "eval" / f"{label}.json").write_text(json.dumps(s))
    s = json.loads((tmp_path / "eval" / "tso-1.json").read_text())
    assert s["verifier_mean"] is None and s["win_rate_key"] == "judge" and s["win_rate_prompts"] == 2
    assert s["win_rate_vs_base"] == pytest.approx(0.5)  # 6 > 5 wins, 4 < 5 loses; prompt 2 and 3 unscored on a side
    assert s["truncation_rate"] == pytest.approx(0.25) and s["judge_parse_rate"] == pytest.approx(0.75)
    (tmp_path / "stage-1" / "pairs").mkdir(parents=True)
    (tmp_path / "stage-1" / "pairs" / "summary.json").write_text(json.dumps(
        {"pairs": 3, "pair_kinds": {"matrix": 3}, "judge": {"judged": 10, "scored": 8, "parse_rate": 0.8},
         "unscored_judge_answers": {"no_score": 2}, "truncated": {"v1": 4}, "truncated_action": "drop"}))
    (tmp_path / "run.json").write_text(json.dumps({"name": "r", "judge": {
        "kind": "uncorrected", "path": "/m/base", "description": "the base model itself, not corrected,"}}))
    text = write_report(tmp_path).read_text()
    assert "ground truth" not in text.replace("not ground truth", "")
    assert "verifier mean" not in text and "| model | correctness |" not in text
    assert "win rate vs base (judge)" in text and "| tso-1 | 5.67 ± 0.88 | 0.50 | 0.75 | 0.25 | 4 |" in text
    assert "The judge is the base model itself, not corrected, at `/m/base`." in text
    assert "above base by the judge's scores: **yes** (5.667 vs 5.000)" in text
    assert "| pairs stage-1 | 10 | 0.80 | no_score 2 |" in text and "| eval tso-1 | 4 | 0.75 | no_score 1 |" in text
    assert "| stage-1 | 3 | matrix 3 | - | 4 (drop) |" in text
