"""The real example's feedback file: the shipped copy is what the generator writes, rendered with the
rubric and answer format of builtin:real-cpu, and every target parses back to its score."""

import json
from pathlib import Path

from tso.config import load_config_ref
from tso.method.judging import extract_score, render_judge_prompt
from tso.models.feedback import FACTS, KINDS, feedback_records


def test_shipped_feedback_is_the_generators_and_matches_the_real_config():
    cfg, _ = load_config_ref("builtin:real-cpu")
    shipped = [json.loads(x) for x in Path(cfg.judge.feedback).read_text().splitlines()]
    rubric = cfg.judge.rubrics[cfg.judge.dimensions[0]]
    assert shipped == feedback_records(rubric, cfg.judge.answer_format)
    assert len(shipped) == len(FACTS) * len(KINDS) and len({r["id"] for r in shipped}) == len(shipped)
    for r in shipped:
        user, target = r["messages"]
        assert extract_score(target["content"]).score == r["score"]
        question = user["content"].split("[User Question]\n")[1].split("\n[The Start")[0]
        answer = user["content"].split("Answer]\n")[1].split("\n[The End")[0]
        assert user["content"] == render_judge_prompt(rubric, question, answer, cfg.judge.answer_format)
    evaluation = {json.loads(x)["prompt"] for x in Path(cfg.eval.prompts).read_text().splitlines()}
    assert not evaluation & {q for q, _, _ in FACTS}  # no evaluation question is in the judge's training data
