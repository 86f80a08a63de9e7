"""A thin mapping onto vLLM's public offline API (``vllm.LLM``, ``vllm.SamplingParams``).

NOT VERIFIED ON A GPU: vLLM cannot be installed on the CPU machines this project is developed and
tested on, so only the mapping of sampling parameters (:func:`to_vllm_sampling_kwargs`) is unit
tested. The transformers engine (``tso.engines.hf``) is the one every test exercises. ``import vllm``
happens only when a :class:`VLLMEngine` is built, so this module imports anywhere.

Differences from the transformers engine worth knowing: vLLM derives the ``n`` samples of a request
from the request's one seed with its own scheme (so sample ``j > 0`` differs from the transformers
engine's for the same seed); a hot-swap waits for running ``generate`` calls, frees the old ``LLM``
(vLLM claims a fixed share of GPU memory, so two cannot coexist) and builds the new one; calls that
arrive meanwhile wait for it instead of failing.
"""

from __future__ import annotations

import gc
import importlib.util
import secrets
import threading
from typing import Any

from tso.engines.base import GenerationEngine, GenerationResult, SamplingParams


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def to_vllm_sampling_kwargs(params: SamplingParams, max_tokens: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request. Unseeded requests get a fresh
    seed here so that the seed can be reported back, as the transformers engine does."""
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return {
        "n": params.n,
        "temperature": float(params.temperature),  # vLLM treats 0 as greedy, like tso
        "top_p": float(params.top_p),
        "max_tokens": int(max_tokens if max_tokens is not None else params.max_new_tokens),
        "seed": int(seed),
    }


def _finish_reason(reason: str | None) -> str:
    return "stop" if reason == "stop" else "length"  # vLLM: "stop" (EOS or stop string) | "length"


def _stop_token(tokenizer, sample) -> str | None:
    """vLLM's ``stop_reason`` is the stop token id (None when the model's own EOS ended it)."""
    if sample.finish_reason != "stop":
        return None
    if isinstance(sample.stop_reason, int):
        return tokenizer.convert_ids_to_tokens(sample.stop_reason)
    return tokenizer.eos_token


class VLLMEngine(GenerationEngine):
    name = "vllm"

    def __init__(self, path: str, engine_cfg=None, options: dict | None = None):
        if not vllm_available():
            raise ImportError(
                "engine kind 'vllm' needs the vllm package (pip install 'tso[vllm]' on a CUDA machine); "
                "use engine.kind 'transformers' or 'auto' on CPU"
            )
        from tso.config import EngineConfig

        self.cfg = engine_cfg or EngineConfig(kind="vllm")
        self.options = dict(options or {})
        self._lock = threading.Lock()
        self._llm = None
        self._meta: tuple[Any, str, int] | None = None  # (tokenizer, checkpoint, max_context): kept during a swap
        self.load(path)

    def load(self, checkpoint_dir: str) -> None:
        from vllm import LLM

        from tso.models.chat import apply_template_override, stop_token_ids
        from tso.models.checkpoint import require_checkpoint

        require_checkpoint(checkpoint_dir)
        path = str(checkpoint_dir)  # a local directory or a hub id
        with self._lock:
            if self._llm is not None:  # vLLM holds the GPU: release the old engine before building the new one
                self._llm = None
                gc.collect()
                try:
                    import torch

                    torch.cuda.empty_cache()
                except Exception:
                    pass
            kwargs: dict[str, Any] = {
                "model": str(path),
                "dtype": self.cfg.dtype,
                "gpu_memory_utilization": self.cfg.gpu_memory_utilization,
                "trust_remote_code": bool(self.options.get("trust_remote_code")),
            }
            if self.options.get("revision"):
                kwargs["revision"] = self.options["revision"]
            if self.cfg.max_model_len:
                kwargs["max_model_len"] = self.cfg.max_model_len
            llm = LLM(**kwargs)
            max_context = int(llm.llm_engine.model_config.max_model_len)
            tokenizer = apply_template_override(llm.get_tokenizer(), self.options.get("chat_template"))
            self._stop_ids = stop_token_ids(tokenizer, None, self.options.get("stop_tokens"))
            self._llm = llm
            self._meta = (tokenizer, str(path), max_context)

    @property
    def checkpoint(self) -> str:
        return self._meta[1]

    @property
    def tokenizer(self):
        return self._meta[0]

    @property
    def max_context(self) -> int:
        return self._meta[2]

    def generate_ids(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        with self._lock:  # a hot-swap in progress finishes first
            _, checkpoint, max_context = self._meta
            return self._generate(self._llm, checkpoint, max_context, prompts, params)

    def _generate(self, llm, checkpoint, max_context, prompts, params) -> list[GenerationResult]:
        from vllm import SamplingParams as VSamplingParams

        vparams = [
            VSamplingParams(**to_vllm_sampling_kwargs(p, min(p.max_new_tokens, max_context - len(ids))),
                            stop_token_ids=list(self._stop_ids))
            for ids, p in zip(prompts, params)
        ]
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], vparams, use_tqdm=False)
        results = []
        for ids, vp, out in zip(prompts, vparams, outputs):
            samples = sorted(out.outputs, key=lambda o: o.index)
            results.append(GenerationResult(
                texts=[s.text for s in samples],
                num_tokens=[len(s.token_ids) for s in samples],
                finish_reasons=[_finish_reason(s.finish_reason) for s in samples],
                prompt_tokens=len(ids),
                seeds=[vp.seed] * len(samples),
                checkpoint=checkpoint,
                stop_tokens=[_stop_token(self.tokenizer, s) for s in samples],
            ))
        return results
