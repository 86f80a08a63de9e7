"""Which generation engine serves a model: the only module that names the implementations."""

from __future__ import annotations

from typing import Any

from tso.engines.base import GenerationEngine


def engine_kind(kind: str) -> str:
    """Resolve ``EngineConfig.kind``: "vllm" when asked for, or on "auto" when vLLM imports and CUDA
    is present; the transformers engine otherwise."""
    if kind == "vllm":
        return "vllm"
    if kind == "auto":
        from tso.engines.vllm import vllm_available

        if vllm_available():
            import torch

            if torch.cuda.is_available():
                return "vllm"
    return "transformers"


def make_engine(engine_cfg, path: str, options: dict[str, Any] | None = None) -> GenerationEngine:
    """An engine for ``path`` configured by an ``EngineConfig`` and the model's loading options
    (``tso.models.checkpoint.checkpoint_options``: revision, trust_remote_code, chat_template,
    stop_tokens)."""
    if engine_kind(engine_cfg.kind) == "vllm":
        from tso.engines.vllm import VLLMEngine

        return VLLMEngine(path, engine_cfg, options)
    from tso.engines.hf import HFEngine

    return HFEngine(path, engine_cfg, options)
