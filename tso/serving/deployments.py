"""Serve deployments of the model matrix, the policy and the judge (built by ``tso.serving.app``).

Handle-level API (stable; pair formation, evaluation and the run call it through
``tso.serving.client.ServeClient``, the one module that fetches the handles):

Deployments
    ``model-<name>``  one per matrix model (frozen weights)
    ``policy``        the policy being trained: starts at the base model's path, hot-swapped each stage
    ``judge``         the judge (``cfg.judge.path``, or the base model as the *uncorrected* judge)

``await handle.generate.remote(request) -> dict`` (model-<name>, policy, judge)
    request: ``{"prompt": str | [{"role", "content"}, ...], "n": int = 1, "temperature": float | None,
    "top_p": float | None, "max_new_tokens": int | None, "seed": int | None}`` (None or left out:
    the run config's ``pairs.sampling``; the judge's default is ``judge.sampling``).
    result: ``{"texts": [str] * n, "model": name, "checkpoint": path, "finish_reasons": ["stop" |
    "length"] * n, "num_tokens": [int] * n, "prompt_tokens": int, "seeds": [int] * n}``.
    The same ``seed`` gives the same texts whichever requests share the batch.

``await handle.score.remote(request) -> dict`` (judge)
    request: ``{"prompt": str | chat, "response": str, "dimension": str | None}``.
    result: ``{"score": float | None, "evidence": str, "raw": str, "dimension": str, "checkpoint": str,
    "reason": str | None, "dimensions": [{"dimension", "score", "evidence", "raw", "reason"}, ...]}``.
    ``score`` is None when the judge's answer has no score in [2, 10] (``reason`` says why: "no_score"
    or "out_of_range"), never a default number. Without a dimension every configured dimension is
    scored; ``score`` is the mean of the scored ones, ``dimension`` is "mean", and ``dimensions``
    holds each one.

``await handle.generate_many.remote([request, ...], return_exceptions=False)`` / ``score_many``: the
    same for a list, in one handle call. One bad request fails the call, as it would fail its own
    ``generate``/``score``; with ``return_exceptions=True`` it takes its place in the list as
    ``{"error": {"code", "message", ...}}`` and the others are answered. ``score_many(...,
    too_long="unscored")`` answers a judge prompt that does not fit the judge's context as unscored
    with reason ``too_long`` instead of failing it.

``generate_stream`` / ``score_stream``: the same, as async generators yielding the one result dict
    (``ray.data.llm.ServeDeploymentProcessorConfig`` calls methods with ``stream=True``); the
    ``request_id`` / ``idx_in_batch`` keys that processor adds are ignored.

``await handle.info.remote() -> dict``: name, deployment, role, version, size, checkpoint (served
    now), path (configured), engine, max_context, base, replica (its id), batching; the judge adds
    dimensions and uncorrected (true while it serves the base model's weights).
``await handle.stats.remote(reset=False) -> dict``: batches, requests (batch items: a judge score
    request is one item per dimension) and rows (items x n) seen, the largest batch and a histogram.

In one process without Ray the same dicts are answered by ``tso.engines.requests.generate_requests``
and ``tso.serving.judge.JudgeScorer`` (the code these deployments run).

Errors: a bad request raises ``tso.engines.EngineInputError`` (a ValueError; ``PromptTooLongError``
with ``limit`` and ``prompt_tokens`` when the prompt does not fit the context). It fails that request
only; the replica and the other requests of its batch carry on.

Batching: concurrent requests (each judge dimension is one) are gathered by ``@serve.batch``
(``engine.max_batch_size``, ``engine.batch_wait_timeout_s``; ``max_ongoing_requests`` is raised to at
least ``max_batch_size``) and generated in one engine call on the replica's generation thread (or its
event loop: ``engine.generate_on``); requests arriving meanwhile queue in Serve and form the next batch.

Hot-swap: ``user_config={"checkpoint": "<model dir>", ...}`` (``tso.serving.app.swap_checkpoint``); the
other keys (configured path, role, matrix version, base) change when a stage registers a new policy,
also without a restart.
``reconfigure`` loads the new weights while requests keep being answered: the transformers engine
loads a second copy on a thread and switches in one assignment (a batch that started before runs on
the old weights, every later batch on the new ones); the vLLM engine reloads in place between
requests (``tso.engines.vllm``). Each result reports the checkpoint and ``weight_version`` that
produced it. A new checkpoint of another architecture, or whose tensors miss or change shape, is
refused before it is loaded (``swap_problem``). A swap that fails leaves the old weights serving and
says why in ``info()["load_error"]`` (raising would restart the replica into the same failure);
``swap_checkpoint`` checks what is served.

Engines that batch by themselves (vLLM: ``engine.is_async``) get each request as it arrives
(continuous batching); the transformers engine gets ``@serve.batch`` batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from tso.config import EngineConfig, JudgeConfig, SamplingConfig
from tso.engines.base import EngineInputError, GenerationResult, SamplingParams
from tso.engines.factory import make_engine
from tso.engines.requests import GenerationRequest, error_dict, parse_request, result_dict
from tso.serving.judge import JudgeScorer

logger = logging.getLogger("ray.serve")

# user_config: the weights served now and the matrix facts a stage changes (tso.serving.app builds it)
USER_CONFIG_KEYS = {"checkpoint", "path", "role", "version", "base", "base_path"}


class ModelServer:
    """One model behind Serve: batched generation, hot-swappable weights."""

    def __init__(self, *, name: str, deployment: str, engine: dict, sampling: dict, size: float | None = None,
                 options: dict | None = None):
        # Only what needs a new replica is a constructor argument (it is hashed into the Serve version);
        # what a stage changes (weights, role, base) is user_config, applied by `reconfigure`, which Serve
        # also calls once right after construction.
        self.name, self.deployment, self.size = name, deployment, size
        self.role, self.path, self.version, self.base, self.base_path = "none", None, None, None, None
        self.engine_cfg = EngineConfig.model_validate(engine)
        self.options = dict(options or {})  # revision, trust_remote_code, chat_template, stop_tokens
        self.sampling = SamplingConfig.model_validate(sampling)
        self.engine = None
        self.load_error: str | None = None  # the last swap that failed (the old weights kept serving)
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix=f"{deployment}-load")
        self._batcher = ThreadBatcher(self._run_batch, self.engine_cfg.max_batch_size,
                                      self.engine_cfg.batch_wait_timeout_s, f"{deployment}-generate")
        self._generate_batch.set_max_batch_size(self.engine_cfg.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.engine_cfg.batch_wait_timeout_s)
        self._stats = _BatchStats()
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve
            self.replica = ""

    # -- hot-swap

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        user_config = dict(user_config or {})
        unknown = set(user_config) - USER_CONFIG_KEYS
        if unknown:
            raise ValueError(f"{self.deployment}: unknown user_config keys {sorted(unknown)} "
                             f"(have: {', '.join(sorted(USER_CONFIG_KEYS))})")
        for key in USER_CONFIG_KEYS - {"checkpoint"}:
            if key in user_config:
                setattr(self, key, user_config[key])
        checkpoint = user_config.get("checkpoint") or self.path
        if not checkpoint:
            raise ValueError(f"{self.deployment}: user_config names no checkpoint and no path")
        if self.engine is None:  # replica start: no request can arrive before this returns
            self.engine = make_engine(self.engine_cfg, checkpoint, self.options)
            self._engine_started()
            logger.info("%s serving %s (%s engine, context %d)", self.deployment, checkpoint, self.engine.name,
                        self.engine.max_context)
            return
        if checkpoint == self.engine.checkpoint:
            self.load_error = None  # what is configured is what serves: an earlier failed swap is no longer pending
            return
        logger.info("%s: loading %s (serving %s meanwhile)", self.deployment, checkpoint, self.engine.checkpoint)
        try:
            if self.engine.is_async:  # the vLLM engine checks the new checkpoint itself
                await self.engine.aload(checkpoint)
            else:
                problem = swap_problem(self.engine.checkpoint, checkpoint)
                if problem:
                    raise ValueError(problem)
                await asyncio.get_running_loop().run_in_executor(self._load_pool, self.engine.load, checkpoint)
        except Exception as e:  # keep serving the old weights: raising here would restart the replica into the same failure
            self.load_error = str(e) if str(e).startswith(checkpoint) else f"{checkpoint}: {e}"
            logger.error("%s: could not load %s, still serving %s: %s", self.deployment, checkpoint,
                         self.engine.checkpoint, e)
            return
        self.load_error = None
        logger.info("%s: now serving %s", self.deployment, checkpoint)

    def _engine_started(self) -> None:
        """Called once, when the first checkpoint is loaded."""

    # -- generation

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, items: list[tuple[list[int], SamplingParams]]) -> list:
        """``engine.generate_on: event_loop``: a Serve batch generated on this replica's event loop
        (blocking it: health checks, ``info`` and swaps wait for the batch)."""
        return self._run_batch(items)

    def _run_batch(self, items: list[tuple[list[int], SamplingParams]]) -> list:
        self._stats.record(len(items), sum(p.n for _, p in items))
        return self._run(items)

    def _run(self, items: list) -> list:
        """A request at fault fails alone: the others of its batch still get their answers."""
        ids, params = [i[0] for i in items], [i[1] for i in items]
        try:
            return self.engine.generate_ids(ids, params)
        except EngineInputError as e:
            if len(items) == 1:
                return [e]
        out: list[GenerationResult | Exception] = []
        for i, p in items:  # e.g. a hot-swap changed the context between encoding and generation
            try:
                out.extend(self.engine.generate_ids([i], [p]))
            except EngineInputError as e:
                out.append(e)
        return out

    async def _submit(self, ids: list[int], params: SamplingParams) -> GenerationResult:
        if self.engine.is_async:  # vLLM batches continuously by itself: hand it every request as it comes
            self._stats.record(1, params.n)
            return await self.engine.agenerate(ids, params)
        if self.engine_cfg.generate_on == "thread":
            result = await self._batcher.submit((ids, params))
        else:
            result = await self._generate_batch((ids, params))
        if isinstance(result, Exception):
            raise result
        return result

    async def generate(self, request: dict) -> dict:
        req = parse_request(GenerationRequest, request)
        ids = self.engine.encode(req.engine_prompt())
        return result_dict(await self._submit(ids, req.params(self.sampling)), self.name)

    async def generate_stream(self, request: dict):
        yield await self.generate(request)

    async def generate_many(self, requests: list[dict], return_exceptions: bool = False) -> list[dict]:
        """Many requests in one handle call (they still batch with everyone else's): a caller with
        hundreds of requests pays Serve's per-call overhead once per chunk, not once per request."""
        return await _gather(*(self.generate(r) for r in requests), return_exceptions=return_exceptions)

    # -- introspection

    async def info(self) -> dict:
        return {
            "name": self.name,
            "deployment": self.deployment,
            "role": self.role,
            "version": self.version,
            "size": self.size,
            "checkpoint": self.engine.checkpoint,
            "weight_version": self.engine.weight_version,
            "load_error": self.load_error,
            "path": self.path,
            "engine": self.engine.name,
            "max_context": self.engine.max_context,
            "base": self.base,
            "replica": self.replica,
            "pid": os.getpid(),  # for an operator (or a fault test) who must find the process
            "batching": {"max_batch_size": self.engine_cfg.max_batch_size,
                         "batch_wait_timeout_s": self.engine_cfg.batch_wait_timeout_s},
        }

    async def stats(self, reset: bool = False) -> dict:
        out = self._stats.as_dict()
        if reset:
            self._stats = _BatchStats()
        return out

    async def check_health(self) -> None:
        if self.engine is None or not self.engine.checkpoint:
            raise RuntimeError("no model loaded")


class JudgeServer(ModelServer):
    """The judge: one rubric prompt per dimension, batched with every other request of the replica."""

    def __init__(self, *, judge: dict, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.judge_cfg, self.seed = JudgeConfig.model_validate(judge), seed
        self.scorer: JudgeScorer | None = None

    def _engine_started(self) -> None:
        self.scorer = JudgeScorer(self.judge_cfg, self.engine, seed=self.seed)

    async def score(self, request: dict, too_long: str = "raise") -> dict:
        call, dims, encoded = self.scorer.prepare(request, too_long)
        results = await asyncio.gather(*(self._judged(ids) for ids in encoded))
        return self.scorer.combine(call, dims, list(results))

    async def _judged(self, ids: list[int] | None) -> GenerationResult | None:
        return None if ids is None else await self._submit(ids, self.scorer.params)

    async def score_stream(self, request: dict):
        yield await self.score(request)

    async def score_many(self, requests: list[dict], return_exceptions: bool = False,
                         too_long: str = "raise") -> list[dict]:
        """``score`` for many requests in one handle call (see ``generate_many``)."""
        return await _gather(*(self.score(r, too_long) for r in requests), return_exceptions=return_exceptions)

    async def info(self) -> dict:
        out = await super().info()
        out.update(dimensions=self.scorer.dimensions,
                   uncorrected=self.base_path is not None and self.engine.checkpoint == self.base_path)
        return out


class ThreadBatcher:
    """Batches requests for one generation thread (``engine.generate_on: thread``, the default).

    Like ``@serve.batch`` (at most ``max_batch_size`` items, waiting up to ``wait_s`` for a fuller
    batch), but the next batch is formed only when the thread is free: ``@serve.batch`` forms batches
    as soon as its event loop can, so with the generation off the loop it queues many small batches
    behind the running one (measured: 3-4x smaller batches, half the throughput). Here everything that
    arrives during a batch joins the next one, as when the batch blocked the loop, and the loop stays
    free for health checks, ``info`` and swaps meanwhile."""

    def __init__(self, run, max_batch_size: int, wait_s: float, thread_name: str):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    async def submit(self, item):
        if self.queue is None:
            self.queue = asyncio.Queue()
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, future))
        return await future

    async def _next_batch(self) -> list:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [(item, f) for item, f in batch if not f.cancelled()]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.pool, self.run, [item for item, _ in batch])
            except Exception as e:  # a failing engine fails its batch (the caller raises it), not the batcher
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


def swap_problem(served: str, new: str) -> str | None:
    """Why ``new`` must not replace ``served`` in the transformers engine (None: no reason known).
    ``from_pretrained`` accepts a directory of another architecture whose tensors only partly fit it
    (the rest initialised at random, with a warning), so the checks of the vLLM swap apply here too:
    same architecture, every served tensor present with its shape. Only local safetensors directories
    can be compared; anything else is left to the load."""
    from pathlib import Path

    from tso.config import is_hub_id
    from tso.engines.vllm import swap_problem as problem

    if any(is_hub_id(p) or not any(Path(p).glob("*.safetensors")) for p in (served, new)):
        return None
    return problem(served, new)


async def _gather(*calls, return_exceptions: bool) -> list[dict]:
    """Results in order; with ``return_exceptions`` a request at fault is an error dict in its place
    (anything else, a bug or a dying engine, still fails the call)."""
    if not return_exceptions:
        return list(await asyncio.gather(*calls))
    out = []
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, EngineInputError):
            result = error_dict(result)
        elif isinstance(result, BaseException):
            raise result
        out.append(result)
    return out


class _BatchStats:
    """What batching achieved, observable from outside (tests, benchmarks)."""

    def __init__(self):
        self.batches = self.requests = self.rows = 0
        self.sizes: Counter[int] = Counter()

    def record(self, requests: int, rows: int) -> None:
        self.batches += 1
        self.requests += requests
        self.rows += rows
        self.sizes[requests] += 1

    def as_dict(self) -> dict:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "rows": self.rows,
            "max_batch_requests": max(self.sizes, default=0),
            "mean_batch_requests": self.requests / self.batches if self.batches else 0.0,
            "histogram": {str(k): v for k, v in sorted(self.sizes.items())},
        }
