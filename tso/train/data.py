"""Preference pairs for training: read, tokenize, split into mini-batches, shard over workers.

Everything here is deterministic and independent of the number of workers: pairs are sorted by id
before any seeded shuffle, the K mini-batches and each epoch's order come from seeds keyed by
(seed, stage, mini-batch, epoch), and a worker's share of an optimizer step is a contiguous slice of
that step's global batch. Nothing is truncated: a pair longer than ``max_length`` is reported
(count and ids) and left out.

Which token ends a response: a finished answer (finish reason "stop", and every human answer) gets
the policy's token for the end of its turn, so the loss teaches it to stop there: the stop token the
answer's model actually ended with when the policy's tokenizer has it among its stop tokens (the
same model family), else the end-of-turn token of the policy's chat template, else its EOS. An
answer cut by a length limit (kept with ``pairs.truncated: keep``) gets no end token: the policy
must not learn to stop where the limit cut it. The report counts the tokens appended.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tso.method.logprobs import SequenceBatch, collate_pairs, collate_sequences
from tso.models.chat import encode_chat, encode_continuation, end_of_turn_token, render_chat

REQUIRED_PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected")
#: provenance columns training reads when a pairs file has them (written by tso.pairs)
ENDING_COLUMNS = ("chosen_finish_reason", "rejected_finish_reason", "chosen_stop_token", "rejected_stop_token")


@dataclass(frozen=True)
class TokenizedPair:
    id: str
    prompt: list[int]
    chosen: list[int]  # response ids + the end token (finished answers only)
    rejected: list[int]

    @property
    def num_tokens(self) -> int:
        """Tokens in the two rows this pair becomes (prompt counted once per row)."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class TokenizeReport:
    """What was left out and why. ``too_long`` lists ids, ``invalid`` (id or row, reason)."""

    total: int = 0
    kept: int = 0
    too_long: list[str] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)
    end_tokens: Counter = field(default_factory=Counter)  # token appended to finished responses -> count
    unterminated: int = 0  # responses cut by a length limit, trained without an end token

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.total} pairs kept"]
        if self.end_tokens:
            parts.append("end tokens appended: " + ", ".join(f"{t} x{n}" for t, n in self.end_tokens.most_common()))
        if self.unterminated:
            parts.append(f"{self.unterminated} truncated responses trained without an end token")
        if self.too_long:
            head = ", ".join(self.too_long[:5]) + (" ..." if len(self.too_long) > 5 else "")
            parts.append(f"{len(self.too_long)} longer than max_length left out (ids: {head})")
        if self.invalid:
            head = ", ".join(f"{i} ({r})" for i, r in self.invalid[:5]) + (" ..." if len(self.invalid) > 5 else "")
            parts.append(f"{len(self.invalid)} invalid rows left out: {head}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "too_long": list(self.too_long),
                "invalid": [list(x) for x in self.invalid], "end_tokens": dict(self.end_tokens),
                "unterminated": self.unterminated}


# ----------------------------------------------------------------------------- reading


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a pairs Parquet file: id, prompt, chosen, rejected (provenance columns are ignored).

    When the file has a ``prompt_messages`` column (the chat the models saw, as JSON, written by
    tso.pairs), a row's prompt is that chat, so the policy is trained on the context its responses
    were sampled in; ``prompt`` (flat text for reading) is the fallback."""
    import json

    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pairs file")
    table = pq.read_table(path)
    missing = [c for c in REQUIRED_PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: pairs file lacks column(s) {missing} (has {table.column_names})")
    optional = ["prompt_messages", *ENDING_COLUMNS]
    columns = list(REQUIRED_PAIR_COLUMNS) + [c for c in optional if c in table.column_names]
    rows = table.select(columns).to_pylist()
    for row in rows:
        chat = row.pop("prompt_messages", None)
        if isinstance(chat, str) and chat:
            try:
                messages = json.loads(chat)
            except json.JSONDecodeError:
                messages = None  # left to the row check below: the flat prompt is used
            if isinstance(messages, list) and messages:
                row["prompt"] = messages
    return rows


# ----------------------------------------------------------------------------- tokenizing


def _messages(prompt: str | Sequence[dict]) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise TypeError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")


def prompt_text(tokenizer, prompt: str | Sequence[dict]) -> str:
    """The text a prompt becomes: the chat template with the generation prompt when the tokenizer has
    one, else (one message only) the message itself."""
    messages = _messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, messages)
    if len(messages) != 1:
        raise ValueError("a chat prompt needs a tokenizer with a chat template")
    return messages[0]["content"]


def encode_prompt(tokenizer, prompt: str | Sequence[dict]) -> list[int]:
    """A string becomes one user turn; a list of {role, content} messages is a chat. Both go through the
    tokenizer's chat template (with the generation prompt) when it has one."""
    messages = _messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return encode_chat(tokenizer, messages)
    if len(messages) != 1:
        raise ValueError("a chat prompt needs a tokenizer with a chat template")
    return [int(t) for t in tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"]]


def default_end_id(tokenizer) -> int:
    """The token that ends the policy's turn: its template's end-of-turn token, else its EOS."""
    turn = end_of_turn_token(tokenizer)
    if turn is not None:
        return int(tokenizer.convert_tokens_to_ids(turn))
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id and its chat template no end-of-turn token")
    return int(tokenizer.eos_token_id)


def end_id_for(tokenizer, stop_token: str | None, stop_ids: Sequence[int] = ()) -> int:
    """The end token of a finished answer: the one its model ended with when the policy has it among its
    stop tokens, else :func:`default_end_id`."""
    if stop_token:
        tid = tokenizer.convert_tokens_to_ids(stop_token)
        if isinstance(tid, int) and tid in set(stop_ids) | {tokenizer.eos_token_id}:
            return tid
    return default_end_id(tokenizer)


def encode_response(tokenizer, text: str, finished: bool = True, end_id: int | None = None,
                    after: tuple[str, list[int]] | None = None) -> list[int]:
    """Response tokens, plus the end token when the answer is finished (it is in the loss, so the
    policy learns where to stop). ``after`` = (prompt text, prompt ids) tokenizes the response as it
    follows the prompt (``tso.models.chat.encode_continuation``)."""
    ids = (encode_continuation(tokenizer, after[0], after[1], text) if after
           else [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]])
    if not finished:
        return ids
    return ids + [default_end_id(tokenizer) if end_id is None else int(end_id)]


def tokenize_pairs(rows: list[dict[str, Any]], tokenizer, max_length: int, stop_ids: Sequence[int] = ()
                   ) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Tokenize rows, sorted by id. Over-long pairs and malformed rows are reported, never truncated.
    ``stop_ids``: the policy's stop tokens (``tso.models.chat.stop_token_ids``)."""
    report = TokenizeReport(total=len(rows))
    seen: set[str] = set()
    out: list[TokenizedPair] = []
    for i, row in enumerate(rows):
        pid = row.get("id")
        label = str(pid) if pid is not None else f"row {i}"
        if pid is None or not isinstance(pid, str) or not pid:
            report.invalid.append((label, "id must be a non-empty string"))
            continue
        if pid in seen:
            report.invalid.append((label, "duplicate id"))
            continue
        bad = [c for c in ("chosen", "rejected") if not isinstance(row.get(c), str)]
        if bad or row.get("prompt") is None:
            report.invalid.append((label, f"missing or non-string {bad or ['prompt']}"))
            continue
        try:
            text = prompt_text(tokenizer, row["prompt"])
            prompt = encode_prompt(tokenizer, row["prompt"])
        except (TypeError, ValueError, KeyError) as e:
            report.invalid.append((label, f"prompt: {e}"))
            continue
        if not prompt:
            report.invalid.append((label, "prompt has no tokens"))
            continue
        sides = []
        for side in ("chosen", "rejected"):
            finished = row.get(f"{side}_finish_reason") != "length"
            end = end_id_for(tokenizer, row.get(f"{side}_stop_token"), stop_ids) if finished else None
            sides.append((encode_response(tokenizer, row[side], finished, end, after=(text, prompt)), finished, end))
        if any(not ids for ids, _, _ in sides):
            report.invalid.append((label, "a truncated response has no tokens"))
            continue
        seen.add(pid)
        (chosen, _, _), (rejected, _, _) = sides
        if len(prompt) + max(len(chosen), len(rejected)) > max_length:
            report.too_long.append(pid)
            continue
        for _, finished, end in sides:
            if finished:
                report.end_tokens[tokenizer.convert_ids_to_tokens(end)] += 1
            else:
                report.unterminated += 1
        out.append(TokenizedPair(pid, prompt, chosen, rejected))
    out.sort(key=lambda p: p.id)
    report.kept = len(out)
    return out, report


# ----------------------------------------------------------------------------- ordering and sharding


def seeded_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


def split_minibatches(n: int, k: int, seed: int, stage: int = 0) -> list[list[int]]:
    """Seeded shuffle of ``n`` id-sorted items, split into ``k`` mini-batches whose sizes differ by at most
    one. Returns index lists into the id-sorted list."""
    if k < 1:
        raise ValueError(f"minibatches must be >= 1, got {k}")
    if n < k:
        raise ValueError(f"{n} pairs cannot be split into {k} mini-batches")
    perm = seeded_rng(seed, stage, 0x5EED).permutation(n)
    return [part.tolist() for part in np.array_split(perm, k)]


def epoch_steps(minibatch: Sequence[int], global_batch: int, seed: int, stage: int, k: int,
                epoch: int) -> tuple[list[list[int]], int]:
    """One epoch over a mini-batch: a seeded order cut into full optimizer steps of ``global_batch``.
    Returns (steps, dropped): the remainder of the epoch (fewer than one step) is left out; it differs
    from epoch to epoch because the order does."""
    n = len(minibatch)
    if n < global_batch:
        raise ValueError(
            f"mini-batch {k + 1} has {n} pairs, fewer than one optimizer step (global_batch={global_batch}); "
            "lower train.global_batch or train.minibatches, or bring more pairs"
        )
    order = seeded_rng(seed, stage, k + 1, epoch + 1).permutation(n)
    items = [minibatch[i] for i in order]
    steps = n // global_batch
    return [items[s * global_batch : (s + 1) * global_batch] for s in range(steps)], n - steps * global_batch


def shard(step: Sequence[int], rank: int, world: int) -> list[int]:
    """This worker's contiguous slice of one optimizer step's global batch."""
    if len(step) % world:
        raise ValueError(f"a step of {len(step)} pairs cannot be split evenly over {world} workers")
    per = len(step) // world
    return list(step[rank * per : (rank + 1) * per])


def chunks(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def length_sorted_chunks(pairs: Sequence[TokenizedPair], indices: Sequence[int], size: int) -> list[list[int]]:
    """Batches of similar length (less padding) for the no-grad reference pass."""
    order = sorted(indices, key=lambda i: (pairs[i].num_tokens, pairs[i].id))
    return chunks(order, size)


def length_grouped_micro_batches(pairs: Sequence[TokenizedPair], step: Sequence[int], size: int) -> list[list[int]]:
    """One optimizer step's pairs (a worker's share) cut into micro-batches of similar length.

    The step's pairs are sorted by (tokens, id), so the grouping is a function of the step's (seeded) content
    only, and cut into equal-size micro-batches: each micro-batch loss is a mean over ``size`` pairs and the
    step averages them, so the step's loss and gradient are those of the ungrouped step (to float tolerance);
    only the padding, and so the time, changes. Each pair keeps its chosen and rejected answers together."""
    if len(step) % size:
        raise ValueError(f"a step share of {len(step)} pairs does not split into micro-batches of {size}")
    return length_sorted_chunks(pairs, step, size)


def collate_pair_batch(pairs: Sequence[TokenizedPair], indices: Sequence[int], pad_id: int,
                       pad_to_multiple_of: int | None = None) -> SequenceBatch:
    sel = [pairs[i] for i in indices]
    return collate_pairs([p.prompt for p in sel], [p.chosen for p in sel], [p.rejected for p in sel], pad_id,
                         "right", pad_to_multiple_of)


def collate_sft_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    return collate_sequences([p for p, _ in examples], [a for _, a in examples], pad_id, "right")


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """Identifies a training set (ids and token counts) so a resume cannot mix up two pair files."""
    import hashlib

    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.id}\t{len(p.prompt)}\t{len(p.chosen)}\t{len(p.rejected)}\n".encode())
    return h.hexdigest()[:16]
