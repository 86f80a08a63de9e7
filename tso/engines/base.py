"""Text generation behind one interface, so Serve deployments do not care which engine runs.

A prompt is a string or a chat (a list of ``{"role", "content"}`` messages rendered with the
tokenizer's chat template). A prompt that does not fit the model's context is rejected with
:class:`PromptTooLongError` (never truncated). Sampling parameters are bounded pydantic fields, so a
request that reaches an engine is already in range.
"""

from __future__ import annotations

import hashlib
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tso.models.chat import ChatTemplateError, render_chat

#: Upper bound on new tokens per request (the same bound as ``SamplingConfig.max_new_tokens``).
MAX_NEW_TOKENS_CAP = 32768
MAX_SAMPLES = 64
SEED_MAX = 2**63 - 1

Message = dict[str, str]
Prompt = str | list[Message]
FinishReason = Literal["stop", "length"]


class SamplingParams(BaseModel):
    """How one request samples. ``temperature == 0`` is greedy decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.7, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS_CAP)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    n: int = Field(1, ge=1, le=MAX_SAMPLES)


@dataclass
class GenerationResult:
    """The ``n`` samples of one prompt."""

    texts: list[str]
    num_tokens: list[int]  # generated tokens per sample (an end-of-sequence token counts)
    finish_reasons: list[FinishReason]  # "stop": a stop token ended it; "length": max_new_tokens or context
    prompt_tokens: int
    seeds: list[int] = field(default_factory=list)  # the seed each sample was drawn with
    checkpoint: str = ""
    stop_tokens: list[str | None] = field(default_factory=list)  # the token that ended each sample (None: length)
    weight_version: int = 0  # the engine's swaps before these samples (0: the weights it started with)


class EngineInputError(ValueError):
    """The request is at fault (a 4xx at the REST edge), not the engine."""

    status = 422
    code = "invalid_request"

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message = message
        self.details = details

    def __reduce__(self):  # keep the type and details across process boundaries (Ray, pickling)
        return (_rebuild_error, (type(self), self.message, self.details))


def _rebuild_error(cls, message, details):
    return cls(message, **details)


class PromptTooLongError(EngineInputError):
    """The prompt leaves no room for a single new token in the model's context."""

    status = 413
    code = "prompt_too_long"

    def __init__(self, message: str = "", *, prompt_tokens: int, limit: int, **details: Any):
        message = message or (
            f"prompt is {prompt_tokens} tokens; the model's context is {limit} tokens "
            f"(at most {limit - 1} prompt tokens, so that one token can be generated)"
        )
        super().__init__(message, prompt_tokens=prompt_tokens, limit=limit, **details)
        self.prompt_tokens, self.limit = prompt_tokens, limit


class ChatFormatError(EngineInputError):
    """A chat prompt that cannot be rendered (bad messages, or a tokenizer without a chat template)."""

    code = "invalid_chat"


def sample_seed(seed: int | None, index: int) -> int:
    """The seed of sample ``index`` of a request: the request seed itself for the first sample, a hash
    of (seed, index) for the others, so samples of one request are independent but reproducible."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & SEED_MAX


def request_seeds(params: SamplingParams) -> list[int]:
    """Per-sample seeds; an unseeded request draws a fresh random seed (reported back in results)."""
    base = params.seed if params.seed is not None else secrets.randbits(63)
    return [sample_seed(base, j) for j in range(params.n)]


def validate_chat(messages: Any) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("a chat prompt must be a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or not {"role", "content"} <= set(m):
            raise ChatFormatError(f"message {i} must have exactly the keys 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str):
            raise ChatFormatError(f"message {i}: role must be system|user|assistant and content a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class GenerationEngine(ABC):
    """One model that generates text. Implementations live in their own modules and are picked by
    ``tso.engines.factory.make_engine``; this module names none of them."""

    name: str = "engine"

    @abstractmethod
    def load(self, checkpoint_dir: str) -> None:
        """Load weights from a Hugging Face model directory. The switch is atomic: a ``generate`` call
        that started before ``load`` finishes on the old weights, later calls use the new ones."""

    @property
    @abstractmethod
    def checkpoint(self) -> str:
        """The directory whose weights are served now."""

    @property
    @abstractmethod
    def tokenizer(self):
        """The Hugging Face tokenizer of the served checkpoint."""

    @property
    @abstractmethod
    def max_context(self) -> int:
        """Prompt plus generated tokens may not exceed this."""

    #: engines that batch by themselves (vLLM) are awaited request by request (``agenerate``, ``aload``)
    is_async = False

    @property
    def weight_version(self) -> int:
        """Loads after the first one: every result names the version that produced it."""
        return 0

    def render(self, prompt: Prompt) -> str:
        """The text a prompt becomes: a string as-is, a chat through the tokenizer's chat template."""
        if isinstance(prompt, str):
            return prompt
        try:
            return render_chat(self.tokenizer, validate_chat(prompt))
        except ChatTemplateError as e:
            raise ChatFormatError(str(e)) from None

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, checked against the context (raises PromptTooLongError)."""
        if not isinstance(prompt, (str, list)):
            raise EngineInputError("a prompt is a string or a list of {role, content} messages")
        text = self.render(prompt)
        ids = self.tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]
        if len(ids) >= self.max_context:
            raise PromptTooLongError(prompt_tokens=len(ids), limit=self.max_context)
        if not ids:
            raise EngineInputError("the prompt is empty (no tokens)")
        return list(ids)

    @abstractmethod
    def generate_ids(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        """Generate from already encoded prompts (see :meth:`encode`)."""

    def generate(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[GenerationResult]:
        """Generate ``params[i].n`` samples for each prompt; one result per prompt, in order."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        return self.generate_ids([self.encode(p) for p in prompts], params)
