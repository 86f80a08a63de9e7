"""Verdicts with intervals from one run's evaluation records (tso.run.verdicts), by hand, and in the report."""

from __future__ import annotations

import json
import math

import pytest

from tso.run.report import write_report
from tso.run.verdicts import claims_from_records, compare, mean_interval, run_claims, t_975, verdict, verdict_lines


def test_t_quantile_matches_scipys():
    from scipy import stats

    for df in (1, 2, 3, 4, 5, 7, 10, 30, 100, 1000):
        assert t_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3), df


def test_mean_interval_and_verdict_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, half-width t(2) / sqrt(3) = 4.3027 / 1.7321 = 2.484
    r = mean_interval([1.0, 2.0, 3.0])
    assert r["mean"] == pytest.approx(2.0) and r["low"] == pytest.approx(2 - 4.3027 / math.sqrt(3), abs=1e-4)
    assert verdict(r["low"], r["high"]) == "inconclusive"  # [-0.48, 4.48] holds 0
    assert verdict(0.1, 0.5) == "holds" and verdict(-0.5, -0.1) == "contradicted" and verdict(None, None) == "inconclusive"
    assert mean_interval([1.5]) == {"n": 1, "mean": 1.5, "low": None, "high": None}
    assert mean_interval([])["mean"] is None


def test_claims_of_a_run_and_unscored_prompts_left_out():
    assert run_claims(["base", "dpo", "tso-2", "tso-1", "tso-10"]) == [
        ("tso-1", "base"), ("tso-2", "tso-1"), ("tso-10", "tso-2"), ("tso-10", "base"), ("tso-10", "dpo")]
    assert run_claims(["base", "dpo"]) == [] and run_claims(["tso-1"]) == []
    scores = {"a": {str(i): 5.0 + 0.5 + 0.01 * i for i in range(20)}, "b": {str(i): 5.0 for i in range(19)}}
    c = compare("a", "b", scores)  # prompt 19 has no score for b: left out
    assert c["n"] == 19 and c["verdict"] == "holds" and c["mean"] == pytest.approx(0.5 + 0.01 * 9)
    assert compare("b", "a", scores)["verdict"] == "contradicted"


def _records(label, values, key="verifier"):
    return [{"id": str(i), "label": label, key: v, **({"judge": 5.0} if key == "verifier" else {})}
            for i, v in enumerate(values)]


def test_verdicts_use_the_verifier_when_there_is_one_else_the_judge():
    recs = {"base": _records("base", [4, 5, 4, 5, 4, 5]), "tso-1": _records("tso-1", [6, 7, 6, 7, 6, None])}
    out = claims_from_records(recs)
    assert out["score"] == "verifier" and [c["claim"] for c in out["claims"]] == ["tso-1 > base"]
    assert out["claims"][0]["n"] == 5 and out["claims"][0]["verdict"] == "holds"
    judged = {k: [dict(r, verifier=None, judge=r["verifier"]) for r in v] for k, v in recs.items()}
    assert claims_from_records(judged)["score"] == "judge"
    line = verdict_lines(out)[0]
    assert line.startswith("tso-1 > base: holds (mean difference +2.000, 95% interval [+2.000, +2.000]") and "5 prompts" in line


def test_report_has_the_verdicts_table_and_file(tmp_path):
    from tso.run.evaluate import summarize_model

    (tmp_path / "eval").mkdir()
    values = {"base": [4, 5, 4, 5, 4, 5, 4, 5], "tso-1": [6, 5, 6, 5, 6, 5, 6, 5], "tso-2": [6, 5, 5, 6, 6, 5, 6, 6],
              "dpo": [7, 8, 7, 8, 7, 8, 7, 8]}
    for label, v in values.items():
        recs = _records(label, v)
        (tmp_path / "eval" / f"{label}.answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        s = {"label": label, "path": f"/m/{label}", **summarize_model(recs, None)}
        (tmp_path / "eval" / f"{label}.json").write_text(json.dumps(s))
    text = write_report(tmp_path).read_text()
    saved = json.loads((tmp_path / "verdicts.json").read_text())
    got = {c["claim"]: c["verdict"] for c in saved["claims"]}
    assert got == {"tso-1 > base": "holds", "tso-2 > tso-1": "inconclusive", "tso-2 > base": "holds",
                   "tso-2 > dpo": "contradicted"}
    assert "### Verdicts" in text and "| tso-2 > dpo | -1.875 |" in text and "**contradicted** |" in text
