"""The judge's scoring logic, shared by the ``judge`` deployment and in-process callers (no Ray here).

For each dimension the user turn is ``render_judge_prompt(rubric, question, answer)`` in the judge
tokenizer's chat template; decoding follows ``judge.sampling`` (greedy by default); the score is the
last ``Score: <number>`` in [2, 10] (``extract_score``), else *unscored* with the reason. Without a
dimension every configured dimension is scored and the response's score is the mean of the scored
ones (``mean_score``).
"""

from __future__ import annotations

from pydantic import Field

from tso.engines.base import EngineInputError, GenerationEngine, GenerationResult, SamplingParams
from tso.engines.requests import HARD_TEXT_CAP, PROMPT_DESCRIPTION, Prompt, _Model, parse_request
from tso.method.judging import extract_score, mean_score, render_judge_prompt


class ScoreRequest(_Model):
    """One answer to judge. Without a dimension every configured dimension is scored."""

    prompt: Prompt = Field(description=PROMPT_DESCRIPTION)
    response: str = Field(max_length=HARD_TEXT_CAP, description="the answer to judge")
    dimension: str | None = Field(None, max_length=128)


def question_text(prompt) -> str:
    """The question a judge sees: a string as-is; a chat as its one user turn or as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].role == "user":
        return prompt[0].content
    return "\n".join(f"{m.role}: {m.content}" for m in prompt)


class JudgeScorer:
    """Turns score requests into judge generations and judge outputs into verdict dicts."""

    def __init__(self, judge_cfg, engine: GenerationEngine, seed: int = 43):
        self.engine = engine
        self.dimensions = list(judge_cfg.dimensions)
        self.rubrics = dict(judge_cfg.rubrics)  # a rubric outside `dimensions` can still be asked for
        s = judge_cfg.sampling
        self.params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                                     seed=seed, n=1)

    def prepare(self, request) -> tuple[ScoreRequest, list[str], list[list[int]]]:
        """Validate a request and encode one judge prompt per dimension (EngineInputError if bad)."""
        call = parse_request(ScoreRequest, request)
        if call.dimension is not None and call.dimension not in self.rubrics:
            raise EngineInputError(f"unknown dimension {call.dimension!r} (have {sorted(self.rubrics)})",
                                   dimension=call.dimension)
        dims = [call.dimension] if call.dimension else self.dimensions
        question = question_text(call.prompt)
        encoded = [
            self.engine.encode([{"role": "user",
                                 "content": render_judge_prompt(self.rubrics[d], question, call.response)}])
            for d in dims
        ]
        return call, dims, encoded

    @staticmethod
    def combine(call: ScoreRequest, dims: list[str], results: list[GenerationResult]) -> dict:
        """The verdict dict of one request from its per-dimension generations."""
        verdicts = [extract_score(r.texts[0]) for r in results]
        per_dim = [{"dimension": d, "score": v.score, "evidence": v.evidence, "raw": v.raw, "reason": v.reason}
                   for d, v in zip(dims, verdicts)]
        checkpoint = results[0].checkpoint
        if call.dimension:
            return {**per_dim[0], "checkpoint": checkpoint, "dimensions": per_dim}
        score = mean_score(verdicts)
        return {
            "score": score,
            "evidence": " | ".join(f"{p['dimension']}: {p['evidence']}" for p in per_dim),
            "raw": "\n".join(f"[{p['dimension']}] {p['raw']}" for p in per_dim),
            "dimension": "mean",
            "checkpoint": checkpoint,
            "reason": None if score is not None else ",".join(sorted({v.reason for v in verdicts if v.reason})),
            "dimensions": per_dim,
        }

    def score(self, request) -> dict:
        return self.score_batch([request])[0]

    def score_batch(self, requests: list, return_exceptions: bool = False) -> list:
        """Score many requests with one engine call over all their dimensions. A bad request raises its
        EngineInputError, or with ``return_exceptions`` takes the exception's place in the output."""
        out: list = [None] * len(requests)
        prepared, rows = [], []
        for i, request in enumerate(requests):
            try:
                call, dims, encoded = self.prepare(request)
            except EngineInputError as e:
                if not return_exceptions:
                    raise
                out[i] = e
                continue
            prepared.append((i, call, dims, len(rows), len(encoded)))
            rows.extend(encoded)
        results = self.engine.generate_ids(rows, [self.params] * len(rows)) if rows else []
        for i, call, dims, start, count in prepared:
            out[i] = self.combine(call, dims, results[start:start + count])
        return out
