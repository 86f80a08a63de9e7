"""Chat templates and stop tokens of a checkpoint's tokenizer: the one place prompts become token ids.

Engines, the pair-formation row checks and training all encode a chat here, so the length a check
counts is the length a model sees. A model's turn can end with a token that is not its EOS
(Gemma's ``<end_of_turn>``, Llama 3's ``<|eot_id|>``): :func:`end_of_turn_token` reads it off the
chat template, and :func:`stop_token_ids` adds it to the EOS ids of the generation config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, str]

_PROBE = "TSO-END-OF-TURN-PROBE"


class ChatTemplateError(ValueError):
    """A chat that cannot be rendered: no template, or a template that rejects the conversation."""


class StopTokenError(ValueError):
    """A configured stop token that the tokenizer does not know as one token."""


def _ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers returns a BatchEncoding
        out = out["input_ids"]
    return [int(t) for t in out]


def as_messages(prompt: str | Sequence[Message]) -> list[Message]:
    """Prompts are instructions: a plain string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_template_override(tokenizer, chat_template: str | None):
    """Supply or replace the tokenizer's chat template (a config's ``chat_template``)."""
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def render_chat(tokenizer, messages: Sequence[Message]) -> str:
    """The text of a chat with the assistant's turn opened (the generation prompt)."""
    if not has_chat_template(tokenizer):
        raise ChatTemplateError("the tokenizer has no chat template (set the model's `chat_template`)")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template that rejects the conversation (e.g. role order)
        raise ChatTemplateError(f"the chat template rejected the conversation: {e}") from None


def encode_text(tokenizer, text: str, special: bool = False) -> list[int]:
    return _ids(tokenizer(text, add_special_tokens=special))


def encode_chat(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids of a rendered chat (the template writes any BOS itself, so none is added)."""
    return encode_text(tokenizer, render_chat(tokenizer, messages))


def encode_continuation(tokenizer, prompt_text: str, prompt_ids: list[int], text: str) -> list[int]:
    """Token ids of ``text`` as the model would have produced it right after the prompt.

    Tokenized on its own, a response can split differently at its start (SentencePiece tokenizers
    add a word-boundary marker to a standalone string); tokenized after the prompt it matches what
    generation produced. Falls back to the standalone ids when the joint tokenization does not
    start with the prompt's ids."""
    joint = encode_text(tokenizer, prompt_text + text)
    if joint[: len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids):]
    return encode_text(tokenizer, text)


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant's message, if any."""
    if not has_chat_template(tokenizer):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:
        return None
    if _PROBE not in text:
        return None
    after = text.rsplit(_PROBE, 1)[1]
    ids = encode_text(tokenizer, after) if after else []
    if ids and ids[0] in _special_ids(tokenizer):
        return tokenizer.convert_ids_to_tokens(ids[0])
    return None


def _token_id(tokenizer, token: str | int) -> int:
    vocab = len(tokenizer)
    if isinstance(token, int):
        if not 0 <= token < vocab:
            raise StopTokenError(f"stop token id {token} is outside the vocabulary (size {vocab})")
        return token
    ids = encode_text(tokenizer, token)
    direct = tokenizer.convert_tokens_to_ids(token)
    if isinstance(direct, int) and direct != getattr(tokenizer, "unk_token_id", None) and 0 <= direct < vocab:
        return direct
    if len(ids) == 1:
        return ids[0]
    raise StopTokenError(f"stop token {token!r} is not one token of this tokenizer (it encodes to {ids})")


def stop_token_ids(tokenizer, generation_config: Any = None, configured: Sequence[str | int] | None = None
                   ) -> tuple[int, ...]:
    """The ids that end an answer: the configured ones, else the generation config's EOS ids, the
    tokenizer's EOS and the template's end-of-turn token (in that order, without repeats)."""
    if configured:
        return tuple(dict.fromkeys(_token_id(tokenizer, t) for t in configured))
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None)
    ids += list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    turn = end_of_turn_token(tokenizer)
    if turn is not None:
        ids.append(tokenizer.convert_tokens_to_ids(turn))
    return tuple(dict.fromkeys(int(i) for i in ids))
