"""Pair formation rules (eq. 9) and prompt-row validation, without a cluster."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tso.method.pairing import Candidate, PairRules, form_pairs, route_self_samples, tries_self_pair
from tso.pairs.prompts import read_prompts

RULES = PairRules(tau_pos=8, tau_neg=4)
POS = [Candidate("good", "v2-l", 9.0)]
NEG = [Candidate("bad", "v1-s", 3.0)]


def _form(samples, try_self=True, rules=RULES, pos=POS, neg=NEG):
    return form_pairs("p1", "q", pos, neg, samples, rules, stage=1, seed=43, try_self=try_self)


def test_self_pair_best_versus_worst():
    samples = [Candidate("a", "policy", 6), Candidate("b", "policy", 9.5), Candidate("c", "policy", 2.5)]
    pairs, counts = _form(samples)
    assert counts == {"self": 1}
    p = pairs[0]
    assert (p.chosen, p.rejected, p.kind) == ("b", "c", "self")
    assert (p.chosen_source, p.rejected_source, p.chosen_score, p.rejected_score) == ("policy", "policy", 9.5, 2.5)
    assert p.self_scores == [6, 9.5, 2.5] and p.stage == 1 and p.seed == 43


def test_only_one_side_qualifies():
    pairs, _ = _form([Candidate("a", "policy", 8.0), Candidate("b", "policy", 5.0)])
    assert (pairs[0].kind, pairs[0].chosen, pairs[0].rejected, pairs[0].rejected_source) == ("self_chosen", "a", "bad", "v1-s")
    pairs, _ = _form([Candidate("a", "policy", 7.0), Candidate("b", "policy", 4.0)])
    assert (pairs[0].kind, pairs[0].chosen, pairs[0].rejected, pairs[0].chosen_source) == ("self_rejected", "good", "b", "v2-l")


def test_neither_side_qualifies_or_unscored_gives_matrix_pair():
    for samples in ([Candidate("a", "policy", 6.0)], [Candidate("a", "policy", None, "no_score")], []):
        pairs, counts = _form(samples)
        assert counts == {"matrix": 1} and pairs[0].chosen == "good" and pairs[0].rejected == "bad"


def test_unscored_samples_are_never_routed():
    pos, neg = route_self_samples([Candidate("x", "policy", None, "no_score"), Candidate("y", "policy", 3.0)], RULES)
    assert pos is None and neg.text == "y"


def test_no_self_pair_when_not_tried():
    pairs, counts = _form([Candidate("b", "policy", 9.5), Candidate("c", "policy", 2.5)], try_self=False)
    assert counts == {"matrix": 1}


def test_judge_filter_drops_and_counts():
    rules = PairRules(judge_filter=True, delta=1.0)
    neg = [Candidate("meh", "v1-s", 8.5)]
    pairs, counts = _form([], try_self=False, rules=rules, neg=neg)
    assert pairs == [] and counts == {"filtered": 1}
    pairs, counts = _form([], try_self=False, rules=rules)
    assert counts == {"matrix": 1}


def test_several_draws_cycle_and_get_distinct_ids():
    pos = [Candidate("g1", "human"), Candidate("g2", "v2-l")]
    neg = [Candidate("b1", "v1-s"), Candidate("b2", "v1-m"), Candidate("b3", "v2-s")]
    pairs, _ = _form([], try_self=False, pos=pos, neg=neg)
    assert [(p.chosen, p.rejected) for p in pairs] == [("g1", "b1"), ("g2", "b2"), ("g1", "b3")]
    assert [p.id for p in pairs] == ["p1#0", "p1#1", "p1#2"]


def test_self_pair_fraction_is_keyed_and_follows_the_fraction():
    draws = [tries_self_pair(43, 1, f"p{i}", 0.5) for i in range(2000)]
    assert draws == [tries_self_pair(43, 1, f"p{i}", 0.5) for i in range(2000)]
    assert sum(draws) / 2000 == pytest.approx(0.5, abs=0.04)
    assert not any(tries_self_pair(43, 1, f"p{i}", 0.0) for i in range(100))


def test_read_prompts_rejects_every_bad_row_with_its_line(tmp_path):
    lines = [
        json.dumps({"id": "a", "prompt": "What is 2+2?", "human": "4"}),
        "{not json",
        json.dumps({"id": "b", "prompt": ""}),
        json.dumps({"id": "c"}),
        json.dumps({"id": "d", "prompt": "x" * 50}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "a", "prompt": "dup"}),
        json.dumps({"id": "e", "prompt": [{"role": "user", "content": "héllo 日本"}]}),
        json.dumps({"id": "f", "prompt": [{"role": "wizard", "content": "hi"}]}),
        json.dumps({"id": "g", "prompt": "ok", "human": 5}),
        json.dumps({"id": "h", "prompt": "ok", "colour": "red", "metadata": "oops"}),
        "",
        json.dumps({"prompt": "no id given", "human_response": "fine"}),
        json.dumps({"id": "fam", "prompt": "1+1?", "family": "add"}),
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ps = read_prompts(path, max_chars=40)
    assert [r["id"] for r in ps.rows] == ["a", "e", "row-13", "fam"]
    assert ps.rows[3]["metadata"] == {"family": "add"}
    assert ps.rows[2]["human"] == "fine"
    assert ps.rows[1]["prompt"][0]["content"] == "héllo 日本"
    got = {(r["line"], r["reason"]) for r in ps.rejects}
    assert got == {
        (2, "invalid_json"), (3, "empty_prompt"), (4, "missing_prompt"), (5, "prompt_too_long"),
        (6, "not_an_object"), (7, "duplicate_id"), (9, "bad_chat_role"), (10, "bad_human_response"),
        (11, "bad_metadata"), (12, "blank_line"),
    }
    assert len(ps.rows) + len(ps.rejects) == len(lines)
    assert "50 characters > limit 40" in next(r["detail"] for r in ps.rejects if r["reason"] == "prompt_too_long")


def test_read_prompts_parquet_and_max_prompts(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": f"q{i}", "prompt": f"p{i}" if i != 2 else " "} for i in range(5)]), path)
    ps = read_prompts(path, max_prompts=2)
    assert [r["id"] for r in ps.rows] == ["q0", "q1"] and ps.over_limit == 2
    assert ps.rejects == [{"line": 3, "reason": "empty_prompt", "detail": "", "raw": '{"id": "q2", "prompt": " "}'}]


def test_self_reward_mode_pairs_best_against_worst_without_thresholds():
    rules = PairRules(mode="self_reward")
    samples = [Candidate("a", "policy", 6.0), Candidate("b", "policy", 7.0), Candidate("c", "policy", None, "no_score")]
    pairs, counts = form_pairs("p", "q", [], [], samples, rules, stage=2, seed=1, try_self=True)
    assert counts == {"self_reward": 1} and (pairs[0].chosen, pairs[0].rejected) == ("b", "a")
    pairs, counts = form_pairs("p", "q", [], [], samples[:1], rules, stage=2, seed=1, try_self=True)
    assert pairs == [] and counts == {"no_self_pair": 1}


def test_invalid_utf8_and_lone_surrogates_are_rejects_with_their_line(tmp_path):
    """Seen live: one such row killed a whole stage (and every resume)."""
    path = tmp_path / "p.jsonl"
    good = json.dumps({"id": "a", "prompt": "fine", "human": "ok"}).encode()
    bad_bytes = b'{"id": "b", "prompt": "caf\xe9 latte"}'  # latin-1, not UTF-8
    surrogate = b'{"id": "c", "prompt": "\\ud800 alone"}'  # valid JSON, not encodable text
    in_human = b'{"id": "d", "prompt": "q", "human": "x\\udfff"}'
    path.write_bytes(b"\n".join([good, bad_bytes, surrogate, in_human, good.replace(b'"a"', b'"e"')]) + b"\n")
    ps = read_prompts(path)
    assert [r["id"] for r in ps.rows] == ["a", "e"]
    got = {(r["line"], r["reason"]) for r in ps.rejects}
    assert got == {(2, "invalid_utf8"), (3, "invalid_unicode"), (4, "invalid_unicode")}
    assert "0xe9" in next(r["detail"] for r in ps.rejects if r["line"] == 2)
    assert "U+D800" in next(r["detail"] for r in ps.rejects if r["line"] == 3)
    json.dumps(ps.rejects).encode("utf-8")  # the rejects themselves can be written


def test_a_missing_human_answer_may_be_null_or_nan(tmp_path):
    """Rows from a dataframe carry a column without answers as NaN: that is no answer, not text."""
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "x", "prompt": "p", "human": float("nan")},
                                         {"id": "y", "prompt": "p", "human": None}]), path)
    ps = read_prompts(path)
    assert [r["human"] for r in ps.rows] == [None, None] and ps.rejects == []
