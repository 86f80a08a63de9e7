"""The judge's prompt and score parser (no model): real judges write the score in many ways."""

import pytest

from tso.method.judging import FORMAT_INSTRUCTIONS, extract_score, format_judge_answer, render_judge_prompt


@pytest.mark.parametrize("text, score", [
    ("Evaluation evidence: fine. Score: 8", 8.0),
    ("Evaluation evidence: fine. Score:8.5", 8.5),
    ("**Evaluation evidence:** fine. **Score:** 7", 7.0),
    ("Score: **9**", 9.0),
    ("**Score: 6.5**", 6.5),
    ("Score：4", 4.0),  # full-width colon
    ("Score: 8/10", 8.0),
    ("score: 3 / 10.", 3.0),
    ("First Score: 2, but on reflection... Score: 9", 9.0),  # the last marker counts
    ("SCORE: 10", 10.0),
])
def test_score_variants_parse_to_the_last_marker(text, score):
    v = extract_score(text)
    assert v.score == score and v.reason is None


@pytest.mark.parametrize("text, reason", [
    ("The answer is good.", "no_score"),
    ("Score: great", "no_score"),
    ("Score: 11", "out_of_range"),
    ("Score: 1.5", "out_of_range"),
    ("Score: 4/5", "other_scale"),
    ("Score: 8 Score: 0", "out_of_range"),  # the last one counts, even when it is the bad one
])
def test_unscored_answers_keep_their_reason_and_no_number(text, reason):
    v = extract_score(text)
    assert v.score is None and v.reason == reason and v.raw == text


def test_evidence_is_the_text_before_the_score():
    assert extract_score("Evaluation evidence: too long, wrong format. Score: 6.5").evidence == "too long, wrong format."
    assert extract_score("**Evaluation evidence:** short. **Score:** 7").evidence == "short."
    assert extract_score("It is correct. Score: 9").evidence == "It is correct."


@pytest.mark.parametrize("fmt", ["evidence_first", "score_only"])
def test_the_rubric_prompt_states_the_answer_format_and_targets_follow_it(fmt):
    prompt = render_judge_prompt("Rate correctness.", "2+2?", "4", fmt)
    assert prompt.startswith("Rate correctness. Score from 2 to 10.") and "[User Question]\n2+2?" in prompt
    assert prompt.endswith(FORMAT_INSTRUCTIONS[fmt]) and "Score: <2-10>" in prompt
    assert ("Evaluation evidence" in prompt) == (fmt == "evidence_first")
    target = format_judge_answer("right.", 9, fmt)
    assert extract_score(target).score == 9.0
    assert target == ("Score: 9.0" if fmt == "score_only" else "Evaluation evidence: right. Score: 9.0")
