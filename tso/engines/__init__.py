"""Text generation behind one interface (``GenerationEngine``): transformers (every test) and vLLM
(a thin, GPU-only mapping). ``make_engine(engine_cfg, path)`` picks one. Imports no ray."""

from tso.engines.base import (
    ChatFormatError,
    EngineInputError,
    GenerationEngine,
    GenerationResult,
    PromptTooLongError,
    SamplingParams,
    make_engine,
)

__all__ = [
    "ChatFormatError",
    "EngineInputError",
    "GenerationEngine",
    "GenerationResult",
    "PromptTooLongError",
    "SamplingParams",
    "make_engine",
]
