"""The judge's scoring logic, shared by the ``judge`` deployment and in-process callers (no Ray here).

For each dimension the user turn is ``render_judge_prompt(rubric, question, answer, answer_format)``
in the judge tokenizer's chat template; decoding follows ``judge.sampling`` (greedy by default); the
score is the last score marker in [2, 10] (``extract_score``), else *unscored* with the reason.
Without a dimension every configured dimension is scored and the response's score is the mean of the
scored ones (``mean_score``).

A judge prompt must fit the judge's context with room for its whole answer (``max_new_tokens``), or
the verdict would be cut short: such a request raises ``PromptTooLongError`` (a 413 at the REST edge)
or, with ``too_long="unscored"`` (pair formation, evaluation), is unscored with reason ``too_long``.
It is never truncated.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tso.engines.base import EngineInputError, GenerationEngine, GenerationResult, PromptTooLongError, SamplingParams
from tso.engines.requests import HARD_TEXT_CAP, PROMPT_DESCRIPTION, Prompt, _Model, parse_request, prompt_for_engine
from tso.method.judging import (
    JudgeVerdict,
    extract_score,
    judge_question,
    mean_score,
    render_judge_prompt,
    too_long_verdict,
)

TooLong = Literal["raise", "unscored"]


class ScoreRequest(_Model):
    """One answer to judge. Without a dimension every configured dimension is scored."""

    prompt: Prompt = Field(description=PROMPT_DESCRIPTION)
    response: str = Field(max_length=HARD_TEXT_CAP, description="the answer to judge")
    dimension: str | None = Field(None, max_length=128)


class JudgeScorer:
    """Turns score requests into judge generations and judge outputs into verdict dicts."""

    def __init__(self, judge_cfg, engine: GenerationEngine, seed: int = 43):
        self.engine = engine
        self.dimensions = list(judge_cfg.dimensions)
        self.rubrics = dict(judge_cfg.rubrics)  # a rubric outside `dimensions` can still be asked for
        self.answer_format = judge_cfg.answer_format
        s = judge_cfg.sampling
        self.params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                                     seed=seed, n=1)

    def _encode(self, rubric: str, question: str, response: str, too_long: TooLong) -> list[int] | None:
        """The judge prompt's ids, or None when it leaves no room for the judge's answer."""
        room = self.params.max_new_tokens
        limit = self.engine.max_context
        try:
            ids = self.engine.encode([{"role": "user",
                                       "content": render_judge_prompt(rubric, question, response, self.answer_format)}])
        except PromptTooLongError as e:
            if too_long == "unscored":
                return None
            raise PromptTooLongError(prompt_tokens=e.prompt_tokens, limit=limit) from None
        if len(ids) + room > limit:
            if too_long == "unscored":
                return None
            raise PromptTooLongError(
                f"the judge prompt is {len(ids)} tokens; with {room} tokens for the judge's answer it needs "
                f"{len(ids) + room}, over the judge's context of {limit}", prompt_tokens=len(ids), limit=limit)
        return ids

    def prepare(self, request, too_long: TooLong = "raise") -> tuple[ScoreRequest, list[str], list[list[int] | None]]:
        """Validate a request and encode one judge prompt per dimension (EngineInputError if bad;
        a None in place of a prompt that is too long, with ``too_long="unscored"``)."""
        call = parse_request(ScoreRequest, request)
        if call.dimension is not None and call.dimension not in self.rubrics:
            raise EngineInputError(f"unknown dimension {call.dimension!r} (have {sorted(self.rubrics)})",
                                   dimension=call.dimension)
        dims = [call.dimension] if call.dimension else self.dimensions
        question = judge_question(prompt_for_engine(call.prompt))
        return call, dims, [self._encode(self.rubrics[d], question, call.response, too_long) for d in dims]

    def combine(self, call: ScoreRequest, dims: list[str], results: list[GenerationResult | None]) -> dict:
        """The verdict dict of one request from its per-dimension generations (None: too long)."""
        verdicts: list[JudgeVerdict] = [extract_score(r.texts[0]) if r is not None else too_long_verdict()
                                        for r in results]
        per_dim = [{"dimension": d, "score": v.score, "evidence": v.evidence, "raw": v.raw, "reason": v.reason}
                   for d, v in zip(dims, verdicts)]
        checkpoint = next((r.checkpoint for r in results if r is not None), self.engine.checkpoint)
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

    def score_batch(self, requests: list, return_exceptions: bool = False, too_long: TooLong = "raise") -> list:
        """Score many requests with one engine call over all their dimensions. A bad request raises its
        EngineInputError, or with ``return_exceptions`` takes the exception's place in the output."""
        out: list = [None] * len(requests)
        prepared, rows = [], []
        for i, request in enumerate(requests):
            try:
                call, dims, encoded = self.prepare(request, too_long)
            except EngineInputError as e:
                if not return_exceptions:
                    raise
                out[i] = e
                continue
            slots = []
            for ids in encoded:
                slots.append(None if ids is None else len(rows))
                if ids is not None:
                    rows.append(ids)
            prepared.append((i, call, dims, slots))
        results = self.engine.generate_ids(rows, [self.params] * len(rows)) if rows else []
        for i, call, dims, slots in prepared:
            out[i] = self.combine(call, dims, [None if k is None else results[k] for k in slots])
        return out
