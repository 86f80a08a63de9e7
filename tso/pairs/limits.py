"""Token-length checks of prompt rows against every model that will see them, before any model call.

A prompt under ``pairs.max_prompt_chars`` can still be longer than a model's context (real
tokenizers, small ``max_model_len``), and a human answer longer than what the policy trains on or
the judge can read. Checked here, per row, with each model's own tokenizer and chat template:

- a matrix source whose context the prompt does not fit (or whose template refuses it) is
  *unavailable* for that row: the row draws
  from the other sources of its mixture (recorded in the provenance, as for a missing human answer);
- a row with no available source on a side is a reject (``no_positive_source`` / ``no_negative_source``);
- a prompt the policy cannot take (its context, or ``train.max_length`` with one answer token) is a
  reject (``prompt_too_long``; ``chat_template_rejected`` when its template refuses the chat, e.g. a
  system turn): no pair of it could be trained;
- a human answer too long for the policy (``train.max_length``) or the judge (rubric, question and
  answer with room for the verdict) is dropped from its row (recorded with its line) and the row
  renormalises alpha.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from tso.method.judging import judge_question, render_judge_prompt
from tso.method.sources import HUMAN
from tso.models.chat import ChatTemplateError, as_messages, encode_chat
from tso.models.checkpoint import checkpoint_options, context_length, judge_options, load_config, load_tokenizer
from tso.serving.client import POLICY


@dataclass
class _Reader:
    """One model's view of a prompt: its tokenizer (with the configured template) and context."""

    tokenizer: object
    context: int
    cache: dict = field(default_factory=dict)

    def prompt_tokens(self, prompt) -> int:
        key = str(prompt)
        if key not in self.cache:
            self.cache[key] = len(encode_chat(self.tokenizer, as_messages(prompt)))
        return self.cache[key]


def _tokenizer_key(path: str, options: dict) -> str:
    files = [Path(path) / "tokenizer.json", Path(path) / "tokenizer_config.json"]
    h = hashlib.sha256(str(options.get("chat_template")).encode())
    for f in files:
        h.update(f.read_bytes() if f.is_file() else path.encode())
    return h.hexdigest()


class RowLimits:
    """The checks above for one stage: built once in the driver, applied to every row."""

    def __init__(self, cfg, policy_path: str | None = None, judge_path: str | None = None):
        self.cfg = cfg
        base = cfg.matrix.entry(cfg.matrix.base)
        mix = cfg.mixtures()
        self.sources = {n for n in (*mix.alpha, *mix.gamma) if n != HUMAN}
        shared: dict[str, object] = {}  # models with the same tokenizer files share one tokenizer

        def reader(path: str, options: dict, max_model_len: int | None) -> _Reader:
            key = _tokenizer_key(path, options)
            if key not in shared:
                shared[key] = load_tokenizer(path, options)
            return _Reader(shared[key], context_length(load_config(path, options), max_model_len))

        self.readers = {m.name: reader(m.path, checkpoint_options(m), m.engine.max_model_len)
                        for m in cfg.matrix.models if m.name in self.sources}
        self.readers[POLICY] = reader(policy_path or base.path, checkpoint_options(base), base.engine.max_model_len)
        judge = judge_path or cfg.judge.path or base.path
        self.judge = reader(judge, judge_options(cfg), cfg.judge.engine.max_model_len)
        self.train_max = cfg.train.max_length
        self.judge_room = cfg.judge.sampling.max_new_tokens

    def _fits(self, name: str, prompt) -> tuple[bool, str, str]:
        """(fits, why not, reject reason) of a prompt for one model."""
        r = self.readers[name]
        try:
            n = r.prompt_tokens(prompt)
        except ChatTemplateError as e:
            return False, f"{name}: {e}", "chat_template_rejected"
        return n < r.context, f"{name}: {n} prompt tokens, context {r.context}", "prompt_too_long"

    def _human_problem(self, row: dict) -> str | None:
        human = row["human"]
        policy = self.readers[POLICY]
        prompt = policy.prompt_tokens(row["prompt"])
        answer = len(policy.tokenizer(human, add_special_tokens=False)["input_ids"]) + 1
        if prompt + answer > min(self.train_max, policy.context):
            return f"{prompt} prompt + {answer} answer tokens > the policy's limit {min(self.train_max, policy.context)}"
        dims = self.cfg.judge.dimensions
        question = judge_question(row["prompt"])
        longest = max(len(encode_chat(self.judge.tokenizer, [{"role": "user", "content": render_judge_prompt(
            self.cfg.judge.rubrics[d], question, human, self.cfg.judge.answer_format)}])) for d in dims)
        if longest + self.judge_room > self.judge.context:
            return (f"judge prompt of {longest} tokens + {self.judge_room} for the verdict > the judge's context "
                    f"{self.judge.context}")
        return None

    def check(self, row: dict) -> tuple[dict, dict | None, dict | None]:
        """(row with its available sources, reject or None, dropped-human record or None)."""
        prompt = row["prompt"]
        ok, why, reason = self._fits(POLICY, prompt)
        if not ok:
            return row, _reject(row, reason, why), None
        tokens = self.readers[POLICY].prompt_tokens(prompt)
        if tokens + 2 > self.train_max:  # an answer token and its end-of-turn token
            return row, _reject(row, "prompt_too_long", f"policy: {tokens} prompt tokens leave no room for an answer "
                                                        f"within train.max_length {self.train_max}"), None
        unavailable = {}
        for name in sorted(self.sources):
            fits, why, _ = self._fits(name, prompt)
            if not fits:
                unavailable[name] = why
        dropped = None
        if row.get("human") is not None:
            problem = self._human_problem(row)
            if problem:
                dropped = _reject(row, "human_too_long", problem, scope="human_answer_dropped")
                row = {**row, "human": None}
        row = {**row, "unavailable": sorted(unavailable)}
        if self.cfg.pairs.mode not in ("self_reward", "rso"):  # no matrix answers in these modes
            mix = self.cfg.mixtures()
            for side, weights in (("positive", mix.alpha), ("negative", mix.gamma)):
                left = [n for n, w in weights.items()
                        if w > 0 and n not in unavailable and (n != HUMAN or row.get("human") is not None)]
                if not left:
                    reasons = "; ".join(unavailable.values()) or "no source with a weight above 0 (and no human answer)"
                    return row, _reject(row, f"no_{side}_source", reasons), dropped
        return row, None, dropped


def _reject(row: dict, reason: str, detail: str, scope: str = "row") -> dict:
    from tso.pairs.prompts import reject_record

    return reject_record(row.get("line", 0), reason, detail, {"id": row["id"], "prompt": row["prompt"]},
                         id=row["id"], scope=scope)
