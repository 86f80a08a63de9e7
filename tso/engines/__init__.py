"""Text generation behind one interface (``GenerationEngine``, in ``base``): transformers and vLLM
(its async engine, with in-place weight swaps), each in its own module; ``factory.make_engine(
engine_cfg, path)`` picks one. Imports no ray."""

from tso.engines.base import (
    ChatFormatError,
    EngineInputError,
    GenerationEngine,
    GenerationResult,
    PromptTooLongError,
    SamplingParams,
)
from tso.engines.factory import make_engine

__all__ = [
    "ChatFormatError",
    "EngineInputError",
    "GenerationEngine",
    "GenerationResult",
    "PromptTooLongError",
    "SamplingParams",
    "make_engine",
]
