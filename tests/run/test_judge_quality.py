"""Judge quality on held-out feedback, computed by hand on a fixture: parse rate, Spearman overall and
per dimension, the length-only floor and the engineering rule; and the file reader's rejects."""

from __future__ import annotations

import json

import pytest

from tso.method.judging import format_judge_answer, render_judge_prompt
from tso.run.judge_quality import judged_answer, length_only, read_held_out, rule_check, score_quality, spread


def _record(i: int, answer: str, score: float, dimension: str | None = None, with_field: bool = False) -> dict:
    r = {"id": f"r{i}", "score": score,
         "messages": [{"role": "user", "content": render_judge_prompt("Rate it.", f"q{i}?", answer)},
                      {"role": "assistant", "content": format_judge_answer("because", score)}]}
    if dimension:
        r["dimension"] = dimension
    if with_field:
        r["answer"] = answer
    return r


# targets 2, 4, 6, 8 per dimension; answers whose lengths rank 4, 3, 1, 2 (not the targets' order)
ANSWERS = ["aaaa", "aaa", "a", "aa"]
TARGETS = [2.0, 4.0, 6.0, 8.0]
RECORDS = [_record(i + 4 * k, a, t, d) for k, d in enumerate(("correctness", "conciseness"))
           for i, (a, t) in enumerate(zip(ANSWERS, TARGETS))]


def test_scores_parse_rate_and_spearman_by_hand():
    truth = [r["score"] for r in RECORDS]
    dims = [r["dimension"] for r in RECORDS]
    # correctness: exact scores; conciseness: one unscored answer and the other three reversed
    outputs = ["Score: 2", "Score: 4", "Score: 6", "Score: 8",
               "no verdict here", "Score: 7", "Score: 5", "Score: 3"]
    q = score_quality(outputs, truth, dims)
    assert q["n"] == 8 and q["parse_rate"] == pytest.approx(7 / 8)
    assert q["spearman_per_dimension"] == {"conciseness": pytest.approx(-1.0), "correctness": pytest.approx(1.0)}
    assert q["within_1"] == pytest.approx(5 / 8)  # the 4 exact ones and 5 for a 6
    assert q["unscored_reasons"] == {"no_score": 1}
    # overall Spearman over the 7 scored (prediction, target) points, ranked with ties averaged
    import numpy as np

    pred, tgt = [2, 4, 6, 8, 7, 5, 3], [2, 4, 6, 8, 4, 6, 8]
    ranks = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)  # noqa: E731
    t = np.array(tgt, float)
    rt = ranks(t)
    for v in np.unique(t):
        rt[t == v] = rt[t == v].mean()
    assert q["spearman"] == pytest.approx(float(np.corrcoef(ranks(pred), rt)[0, 1]))


def test_within_one_counts_misses_against_the_judge():
    q = score_quality(["Score: 3", "Score: 9", "nothing"], [2.0, 4.0, 6.0], ["overall"] * 3)
    assert q["within_1"] == pytest.approx(1 / 3) and q["mae"] == pytest.approx((1 + 5) / 2)
    assert q["spearman"] is None  # two scored points: no correlation


def test_length_only_floor_takes_the_answer_from_the_prompt_or_the_record_and_its_better_direction():
    assert judged_answer(RECORDS[0]) == "aaaa"
    assert judged_answer(_record(0, "from the field", 2.0, with_field=True) | {"messages": RECORDS[1]["messages"]}) == \
        "from the field"
    truth, dims = [r["score"] for r in RECORDS], [r["dimension"] for r in RECORDS]
    floor = length_only(RECORDS, truth, dims)
    # lengths 4,3,1,2 against targets 2,4,6,8: Spearman -0.8 per dimension, reported as 0.8 "shorter is better"
    assert floor["spearman_per_dimension"] == {"conciseness": pytest.approx(0.8), "correctness": pytest.approx(0.8)}
    assert floor["spearman"] == pytest.approx(0.8) and floor["direction"] == "shorter is better"


def test_the_rule_needs_every_clause():
    floor = {"spearman": 0.6}
    good = {"parse_rate": 0.96, "spearman": 0.7}
    assert rule_check(good, floor)["holds"]
    for bad in ({"parse_rate": 0.94, "spearman": 0.7}, {"parse_rate": 1.0, "spearman": 0.45},
                {"parse_rate": 1.0, "spearman": 0.55}, {"parse_rate": 1.0, "spearman": None}):
        checks = rule_check(bad, floor)
        assert not checks["holds"], bad
    assert rule_check({"parse_rate": 1.0, "spearman": 0.55}, floor)["checks"] == {
        "parse_rate >= 0.95": True, "spearman >= 0.5": True, "beats length-only": False}


def test_held_out_reader_rejects_bad_lines_with_their_number_and_spread_samples_evenly(tmp_path):
    path = tmp_path / "held.jsonl"
    lines = [json.dumps(RECORDS[0]), "{not json", json.dumps({"messages": [{"role": "user", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "fine"}]}),
             "", json.dumps(RECORDS[1])]
    path.write_text("\n".join(lines) + "\n")
    records, rejects = read_held_out(path)
    assert [r["id"] for r in records] == ["r0", "r1"]
    assert [n for n, _ in rejects] == [2, 3, 4] and "no target score" in rejects[2][1]
    assert spread(RECORDS, 20) == RECORDS
    # records that cycle through two dimensions: a strided pick would keep one, the sample keeps both
    cycling = [{"id": str(i), "dimension": ("a", "b")[i % 2]} for i in range(1200)]
    picked = spread(cycling, 200)
    assert len(picked) == 200 and [int(r["id"]) for r in picked] == sorted(int(r["id"]) for r in picked)
    assert 70 < sum(r["dimension"] == "a" for r in picked) < 130 and picked == spread(cycling, 200)
