"""The toy world: task generation and splits, the verifier's scale, feedback examples."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from tso.config import DEFAULT_RUBRICS
from tso.method.judging import extract_score
from tso.toyworld.feedback import (
    KIND_WEIGHTS,
    feedback_records,
    read_feedback_jsonl,
    synth_answer,
    write_feedback_jsonl,
)
from tso.toyworld.tasks import (
    FACTS,
    FAMILIES,
    SPLITS,
    generate_splits,
    generate_tasks,
    read_jsonl,
    split_of,
    task_from_row,
    training_pool,
    write_prompts_jsonl,
)
from tso.toyworld.verifier import evidence, verify, verify_dimensions

pytestmark = pytest.mark.timeout(120)


def _task(family: str, **args) -> dict:
    """A task record built from its prompt (the same path a prompts-file row takes)."""
    prompts = {
        "add": "What is {a} + {b}?", "sub": "What is {a} - {b}?", "reverse": "Reverse the word {w}.",
        "sort": "Sort the digits {d}.", "count": "How many {c} in {s}?", "capital": "What is the capital of {x}?",
        "spell": "Spell {w} with dashes.",
    }
    return task_from_row({"prompt": prompts[family].format(**args), "family": family})


# ----------------------------------------------------------------------------- generation and splits


def test_generation_is_deterministic_and_seed_dependent():
    a = generate_tasks("train", 200, seed=7)
    b = generate_tasks("train", 200, seed=7)
    c = generate_tasks("train", 200, seed=8)
    assert a == b
    assert [t["id"] for t in a] != [t["id"] for t in c]
    assert len({t["id"] for t in a}) == 200  # distinct tasks


def test_every_family_appears_balanced_with_checkable_records():
    tasks = generate_tasks("eval", 350, seed=0)
    counts = Counter(t["family"] for t in tasks)
    assert set(counts) == set(FAMILIES)
    assert set(counts.values()) == {50}
    for t in tasks:
        assert {"id", "family", "prompt", "human", "answer", "split", "canonical"} <= set(t)
        assert t["split"] == "eval" and t["human"] == t["answer"]
        assert verify(t, t["human"]) == 10.0  # the reference answer is what the verifier wants


def test_splits_never_overlap_even_across_seeds():
    canon = {s: set() for s in SPLITS}
    for seed in (0, 1):
        for split, tasks in generate_splits(3000, 600, 600, seed=seed).items():
            assert all(t["split"] == split == split_of(t["canonical"]) for t in tasks)
            canon[split] |= {t["canonical"] for t in tasks}
    assert not canon["train"] & canon["eval"]
    assert not canon["train"] & canon["pref"]
    assert not canon["pref"] & canon["eval"]
    # The algorithmic problems are held out in any wording: no eval prompt text is a train prompt.
    train_prompts = {t["prompt"] for t in generate_tasks("train", 3000, 0)}
    assert not {t["prompt"] for t in generate_tasks("eval", 600, 0)} & train_prompts


def test_capital_facts_are_learnable_and_held_out_by_wording():
    train_countries = {t["args"]["x"] for t in generate_tasks("train", 7000, 0) if t["family"] == "capital"}
    eval_caps = [t for t in generate_tasks("eval", 700, 0) if t["family"] == "capital"]
    assert eval_caps and all(t["args"]["x"] in train_countries for t in eval_caps)
    assert len(FACTS) == 80 and len(set(FACTS.values())) == 80


def test_training_pool_repeats_small_families_to_keep_them_balanced():
    pool = training_pool("train", 1400, seed=0)
    assert Counter(t["family"] for t in pool) == {f: 200 for f in FAMILIES}
    assert all(t["split"] == "train" for t in pool)
    assert pool == training_pool("train", 1400, seed=0)


def test_prompts_jsonl_round_trips(tmp_path):
    tasks = generate_tasks("pref", 70, seed=3)
    path = write_prompts_jsonl(tmp_path / "p.jsonl", tasks)
    rows = read_jsonl(path)
    assert [set(r) for r in rows] == [{"id", "prompt", "human", "family"}] * 70
    assert [task_from_row(r) for r in rows] == tasks  # the verifier's fields come back from the prompt
    assert not list(tmp_path.glob(".*tmp"))  # written under a temporary name, renamed into place


def test_unknown_prompt_is_rejected():
    with pytest.raises(ValueError, match="not a toy-world task"):
        task_from_row({"prompt": "Write a poem."})
    with pytest.raises(ValueError, match="unknown split"):
        generate_tasks("test", 3)


# ----------------------------------------------------------------------------- verifier

CASES = {
    # family, task args, exact, buried in extra text, wrong but right format, format violation
    "add": (dict(a=23, b=45), "68", "The answer is 68.", "75", None),
    "sub": (dict(a=71, b=28), "43", "The answer is 43.", "58", None),
    "count": (dict(c="a", s="abacad"), "3", "The answer is 3.", "6", None),
    "reverse": (dict(w="plank"), "knalp", "The answer is knalp.", "zqxwv", "KNALP"),
    "sort": (dict(d="5 2 8 1"), "1 2 5 8", "The answer is 1 2 5 8.", "9 9 0 3", "1,2,5,8"),
    "capital": (dict(x=next(iter(FACTS))), FACTS[next(iter(FACTS))], f"The answer is {FACTS[next(iter(FACTS))]}.",
                "Qwxyz", FACTS[next(iter(FACTS))].lower()),
    "spell": (dict(w="plank"), "p-l-a-n-k", "The answer is p-l-a-n-k.", "q-x-z-v-w", "p l a n k"),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_verifier_orders_answers_on_the_judge_scale(family):
    args, exact, buried, wrong, violation = CASES[family]
    task = _task(family, **args)
    assert task["answer"] == exact
    s_exact, s_buried, s_wrong = verify(task, exact), verify(task, buried), verify(task, wrong)
    assert s_exact == 10.0
    assert s_buried == pytest.approx(7.6, abs=0.01)  # 15 extra characters: conciseness 5.2
    assert 4.0 <= s_wrong <= 4.6  # wrong, right format: about 4
    assert verify(task, "") == 2.0 and verify(task, "   ") == 2.0
    assert verify(task, "%%% ???") == 2.0  # no answer at all
    assert s_exact > s_buried > s_wrong > 2.0
    dims = verify_dimensions(task, buried)
    assert dims == {"correctness": 10.0, "conciseness": 5.2}
    assert verify_dimensions(task, wrong)["conciseness"] == 10.0
    if violation is not None:
        v = verify_dimensions(task, violation)
        assert v["conciseness"] == 8.0  # format violation costs 2 points of conciseness
        assert s_exact > verify(task, violation) > s_wrong


def test_verifier_partial_credit_and_verbosity_are_graded():
    t = _task("add", a=23, b=45)
    assert verify(t, "69") > verify(t, "99")  # a near miss beats a far miss
    assert verify(t, "68.") > verify(t, "The answer is 68.") > verify(
        t, "Sure! Here is the answer you asked for: 68. Let me know if you need anything else!")
    s = _task("sort", d="5 2 8 1")
    assert verify_dimensions(s, "8 5 2 1")["correctness"] == 5.0  # the right digits, not sorted
    w = _task("spell", w="plank")
    assert verify_dimensions(w, "plank")["correctness"] == 5.0  # format task: the bare word is not enough
    r = _task("reverse", w="plank")
    # Chatter after the answer is skipped when looking for the answer word.
    assert verify_dimensions(r, "Sure! knalp. Let me know if you need anything else!")["correctness"] == 10.0
    # Repeating the answer is not the answer.
    assert verify(w, "p-l-a-n-k p-l-a-n-k") < 5


def test_evidence_text_is_short_and_matches_the_case():
    t = _task("add", a=2, b=3)
    assert evidence(t, "5", "correctness") == "correct."
    assert evidence(t, "9", "correctness") == "wrong answer."
    assert evidence(t, "", "correctness") == "empty answer."
    assert evidence(t, "The answer is 5.", "conciseness") == "extra text."
    assert evidence(t, "5", "conciseness") == "concise."


# ----------------------------------------------------------------------------- feedback


def test_feedback_examples_parse_back_to_their_scores(tmp_path):
    tasks = generate_tasks("train", 140, seed=0)
    recs = feedback_records(tasks, seed=0, answers_per_task=3, ai_fraction=0.5, ai_noise=1.0)
    assert len(recs) == 140 * 3 * 2
    assert Counter(r["dimension"] for r in recs) == {"correctness": 420, "conciseness": 420}
    path = write_feedback_jsonl(tmp_path / "fb.jsonl", recs)
    back = read_feedback_jsonl(path)
    assert back == json.loads(json.dumps(recs))
    for r in back:
        user, target = r["messages"]
        assert user["role"] == "user" and target["role"] == "assistant"
        assert user["content"].startswith(DEFAULT_RUBRICS[r["dimension"]])
        assert f"[User Question]\n{r['question']}\n" in user["content"]
        assert f"[The Start of Assistant's Answer]\n{r['answer']}\n[The End" in user["content"]
        verdict = extract_score(target["content"])
        assert verdict.score == r["score"], target["content"]
        assert target["content"].startswith("Evaluation evidence: ") and len(target["content"]) < 70
        assert 2.0 <= r["score"] <= 10.0


def test_feedback_sources_scores_and_answer_kinds():
    tasks = generate_tasks("train", 300, seed=1)
    recs = feedback_records(tasks, seed=1, answers_per_task=2, ai_fraction=0.5, ai_noise=1.5, ai_round=1.0)
    human = [r for r in recs if r["source"] == "human"]
    ai = [r for r in recs if r["source"] == "ai"]
    assert 0.35 < len(ai) / len(recs) < 0.65
    # Human feedback is the verifier's score rounded to 0.5; AI feedback is noisy, integer, in range.
    assert all(abs(r["score"] - r["verifier_score"]) <= 0.25 and (r["score"] * 2).is_integer() for r in human)
    assert all(float(r["score"]).is_integer() and 2 <= r["score"] <= 10 for r in ai)
    noise = [abs(r["score"] - r["verifier_score"]) for r in ai]
    assert sum(noise) / len(noise) > 0.5
    assert set(KIND_WEIGHTS) - {"empty"} <= {r["kind"] for r in recs}
    spread = Counter(round(r["verifier_score"]) for r in recs)
    assert spread[10] and spread[2] and sum(spread[k] for k in range(4, 9)) > 100  # a range of qualities
    # Deterministic and noise-free when asked.
    assert recs == feedback_records(tasks, seed=1, answers_per_task=2, ai_fraction=0.5, ai_noise=1.5, ai_round=1.0)
    exact = feedback_records(tasks[:20], seed=1, ai_fraction=1.0, ai_noise=0.0, ai_round=0.5)
    assert all(r["score"] == round(r["verifier_score"] * 2) / 2 for r in exact)


def test_feedback_uses_model_answers_and_scores_them_with_the_verifier():
    tasks = generate_tasks("train", 50, seed=2)
    offered = {t["id"]: [("v1-s", t["answer"] + " ok"), ("v2-l", t["answer"])] for t in tasks}
    recs = feedback_records(tasks, seed=2, answers_per_task=2, model_answers=offered)
    from_models = [r for r in recs if r["kind"].startswith("model:")]
    assert from_models
    by_id = {t["id"]: t for t in tasks}
    for r in from_models:
        assert r["verifier_score"] == verify_dimensions(by_id[r["task_id"]], r["answer"])[r["dimension"]]


def test_synth_answers_have_the_quality_their_kind_says():
    rng = random.Random(0)
    for t in generate_tasks("eval", 70, seed=0):
        assert verify(t, synth_answer(t, "correct", rng)) == 10
        assert verify(t, synth_answer(t, "wrong", rng)) < 6
        assert verify(t, synth_answer(t, "near_miss", rng)) < 6
        assert 5 < verify(t, synth_answer(t, "verbose", rng)) < 10
        assert verify(t, synth_answer(t, "empty", rng)) == 2
        assert verify(t, synth_answer(t, "format", rng)) < 10


def test_feedback_rejects_bad_settings_and_rows(tmp_path):
    with pytest.raises(ValueError, match="no rubric"):
        feedback_records(generate_tasks("train", 7, 0), dimensions=["factuality"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="row 1: missing fields"):
        read_feedback_jsonl(bad)


def test_chatter_keeps_the_answer_right_and_costs_conciseness():
    """The zoo's chatty SFT targets (tso.toyworld.style): the verifier still finds the right answer
    behind every filler prefix, in every family, and scores it below the bare answer."""
    from tso.toyworld.style import CHATTER_PREFIXES, chatty, styled_answer
    from tso.toyworld.tasks import FAMILIES, generate_tasks
    from tso.toyworld.verifier import verify, verify_dimensions

    tasks = generate_tasks("eval", 140, 0)
    assert {t["family"] for t in tasks} == set(FAMILIES)
    for t in tasks:
        for prefix in CHATTER_PREFIXES:
            dims = verify_dimensions(t, prefix + t["answer"])
            assert dims["correctness"] == 10.0, (t, prefix)
            assert 7.5 <= verify(t, prefix + t["answer"]) <= 8.5 < verify(t, t["answer"]) == 10.0
        assert chatty(t["answer"], t["id"], 0).endswith(t["answer"])
    # the share of chatty targets follows the rate; a task chatty at a low rate is chatty at a higher one
    pool = [{**t, "human": t["answer"]} for t in generate_tasks("train", 2000, 0)]
    chatty_at = {r: {t["id"] for t in pool if styled_answer(t, r, 0) != t["human"]} for r in (0.0, 0.4, 0.8)}
    assert chatty_at[0.0] == set()
    assert abs(len(chatty_at[0.4]) / len(pool) - 0.4) < 0.04 and abs(len(chatty_at[0.8]) / len(pool) - 0.8) < 0.04
    assert chatty_at[0.4] <= chatty_at[0.8]
