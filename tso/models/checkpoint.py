"""Loading a checkpoint the way its config says: a local directory or a hub id, with its revision,
``trust_remote_code`` and chat-template override, and its context length.

``options`` is a plain dict (``checkpoint_options(entry)``: revision, trust_remote_code,
chat_template, stop_tokens) so it travels to Serve replicas and Ray Train workers as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tso.config import is_hub_id
from tso.models.chat import apply_template_override

OPTION_KEYS = ("revision", "trust_remote_code", "chat_template", "stop_tokens")
DEFAULT_CONTEXT = 2048


def checkpoint_options(entry) -> dict[str, Any]:
    """The loading options of a ``ModelEntry`` or ``JudgeConfig`` (tso.config.CheckpointOptions)."""
    return {k: getattr(entry, k, None) for k in OPTION_KEYS}


def _hub_kwargs(options: dict[str, Any] | None) -> dict[str, Any]:
    options = options or {}
    kwargs: dict[str, Any] = {"trust_remote_code": bool(options.get("trust_remote_code"))}
    if options.get("revision"):
        kwargs["revision"] = options["revision"]
    return kwargs


def require_checkpoint(path: str | Path) -> None:
    """A local checkpoint must be a model directory; a hub id is resolved by ``from_pretrained``."""
    if is_hub_id(str(path)):
        return
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model directory at {path} (config.json missing)")


def has_tokenizer_files(path: str | Path) -> bool:
    return is_hub_id(str(path)) or any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(path: str | Path, options: dict[str, Any] | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), **_hub_kwargs(options))
    return apply_template_override(tokenizer, (options or {}).get("chat_template"))


def load_config(path: str | Path, options: dict[str, Any] | None = None):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), **_hub_kwargs(options))


def load_causal_lm(path: str | Path, options: dict[str, Any] | None = None, dtype=None,
                   attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = _hub_kwargs(options)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def context_length(model_config, max_model_len: int | None = None) -> int:
    """Prompt plus answer tokens may not exceed this: the model's positions, capped by the engine's
    ``max_model_len`` (a model config without a limit gets DEFAULT_CONTEXT)."""
    text_config = getattr(model_config, "get_text_config", lambda: model_config)()
    limit = getattr(text_config, "max_position_embeddings", None) or DEFAULT_CONTEXT
    return int(min(limit, max_model_len) if max_model_len else limit)


def judge_options(cfg) -> dict[str, Any]:
    """The judge's loading options. Unset, the judge is the base model (uncorrected, or corrected by
    tso from it), so the base's keys fill the judge's gaps; a configured ``judge.path`` is a model of
    its own and uses only the judge's keys."""
    own = checkpoint_options(cfg.judge)
    if cfg.judge.path is not None:
        return own
    base = checkpoint_options(cfg.matrix.entry(cfg.matrix.base))
    return {k: own[k] if own[k] not in (None, False) else base[k] for k in OPTION_KEYS}


def derived_options(entry) -> dict[str, Any]:
    """The keys a model trained from ``entry`` keeps (a local directory now: no hub revision)."""
    return {**checkpoint_options(entry), "revision": None}


def absolute_checkpoint(path: str | Path) -> str:
    """A local checkpoint as an absolute path (workers run elsewhere); a hub id as it is."""
    return str(path) if is_hub_id(str(path)) else str(Path(path).absolute())
