"""The Hugging Face transformers engine: CPU or GPU, real batched generation.

How a batch is generated (and why per-request seeds are batch-independent):

* Requests are expanded into rows (one per sample), sorted by prompt length and cut into groups of
  at most ``max_batch_rows`` rows whose longest prompt plus longest generation fits the context.
  Each group is one ``model.generate`` call on a left-padded batch (attention mask and position ids
  from the mask), with the KV cache.
* ``generate`` runs in greedy mode with :class:`RowSampler` as its logits processor. The processor
  picks every row's next token itself, with that row's own temperature, top-p and
  ``torch.Generator`` (seeded from the request seed and the sample index), and returns scores that
  are ``-inf`` everywhere but the chosen token, so greedy selection keeps the choice. A row's random
  stream therefore never depends on which other requests share the batch (a batch-wide generator
  would hand out draws by row position). What can still differ between batch compositions is the
  floating point of batched matmuls, which only matters when a draw lands within ~1e-6 of a
  boundary of the top-p cumulative distribution.
* Per-row ``max_new_tokens`` (and the room left in the context) is enforced by forcing the end of
  sequence token once a row has its allowance; that row is reported with finish reason "length".
* A sample stops at any of the model's stop tokens (``tso.models.chat.stop_token_ids``: the EOS ids
  and the chat template's end-of-turn token, or the configured ``stop_tokens``); the result names
  the token that ended it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from tso.engines.base import (
    GenerationEngine,
    GenerationResult,
    PromptTooLongError,
    SamplingParams,
    request_seeds,
)
from tso.models.chat import stop_token_ids
from tso.models.checkpoint import context_length, has_tokenizer_files, load_causal_lm, load_tokenizer, require_checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class _Loaded:
    """Everything that changes together on a hot-swap (one attribute, swapped in one assignment)."""

    model: torch.nn.Module
    tokenizer: object
    checkpoint: str
    max_context: int
    eos_ids: tuple[int, ...]  # every stop token id (EOS ids, end-of-turn, configured stop_tokens)
    pad_id: int
    version: int = 0  # loads after the first one


class RowSampler(LogitsProcessor):
    """Chooses each row's next token with the row's own sampling parameters and random generator."""

    def __init__(self, prompt_width: int, temperatures: list[float], top_ps: list[float],
                 limits: list[int], generators: list[torch.Generator | None], eos_id: int | None):
        self.prompt_width = prompt_width
        self.temperatures = torch.tensor(temperatures, dtype=torch.float32)
        self.top_ps = torch.tensor(top_ps, dtype=torch.float32)
        self.limits = torch.tensor(limits)
        self.generators = generators
        self.sampled = [i for i, t in enumerate(temperatures) if t > 0]
        self.eos_id = eos_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width  # tokens generated so far by every row
        scores = scores.float()
        tokens = scores.argmax(dim=-1)
        if self.sampled:
            idx = torch.tensor(self.sampled, device=scores.device)
            tokens[idx] = sample_rows(
                scores[idx],
                self.temperatures[self.sampled].to(scores.device),
                self.top_ps[self.sampled].to(scores.device),
                torch.stack([torch.rand((), generator=self.generators[i]) for i in self.sampled]).to(scores.device),
            )
        if self.eos_id is not None:
            force = (self.limits == step).to(scores.device)
            tokens = torch.where(force, torch.full_like(tokens, self.eos_id), tokens)
        out = torch.full_like(scores, -math.inf)
        out.scatter_(1, tokens[:, None], 0.0)
        return out


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                uniform: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling by inverse CDF: one uniform draw per row picks from the row's top-p set.

    Pure function (tensors in, token ids out) so the distribution can be tested on its own."""
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(before >= top_p[:, None], 0.0)  # the top token always stays
    cdf = torch.cumsum(sorted_p, dim=-1)
    target = (uniform * cdf[:, -1])[:, None]
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=logits.shape[-1] - 1)
    return order.gather(1, pick).squeeze(1)


def _device(kind: str) -> torch.device:
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(kind)


def _dtype(kind: str, device: torch.device) -> torch.dtype:
    if kind == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return _DTYPES[kind]


class HFEngine(GenerationEngine):
    name = "transformers"

    def __init__(self, path: str, engine_cfg=None, options: dict | None = None, *, max_batch_rows: int | None = None):
        from tso.config import EngineConfig

        self.cfg = engine_cfg or EngineConfig(kind="transformers")
        self.options = dict(options or {})
        self.threads = self.cfg.torch_threads
        torch.set_num_threads(self.threads)
        self.device = _device(self.cfg.device)
        self.dtype = _dtype(self.cfg.dtype, self.device)
        self.max_batch_rows = max_batch_rows or max(self.cfg.max_batch_size, 1)
        self._lock = threading.Lock()  # serialises loads, never generation
        self._state: _Loaded | None = None
        self.load(path)

    # -- loading and hot-swap

    def load(self, checkpoint_dir: str) -> None:
        require_checkpoint(checkpoint_dir)
        with self._lock:
            old = self._state
            if has_tokenizer_files(checkpoint_dir) or old is None:
                tokenizer = load_tokenizer(checkpoint_dir, self.options)
            else:  # a training checkpoint with weights only keeps the served tokenizer
                tokenizer = old.tokenizer
            model = load_causal_lm(checkpoint_dir, self.options, dtype=self.dtype)
            model.to(self.device).eval()
            limit = context_length(model.config, self.cfg.max_model_len)
            eos_ids = stop_token_ids(tokenizer, model.generation_config, self.options.get("stop_tokens"))
            pad = tokenizer.pad_token_id
            if pad is None:
                pad = eos_ids[0] if eos_ids else 0
            version = 0 if old is None else old.version + 1
            self._state = _Loaded(model, tokenizer, str(checkpoint_dir), int(limit), eos_ids, int(pad), version)
        # the old model is freed when the last generate call that holds it returns

    @property
    def checkpoint(self) -> str:
        return self._state.checkpoint

    @property
    def tokenizer(self):
        return self._state.tokenizer

    @property
    def max_context(self) -> int:
        return self._state.max_context

    @property
    def weight_version(self) -> int:
        return self._state.version

    # -- generation

    def generate_ids(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        if torch.get_num_threads() != self.threads:  # each thread of a replica may start with the default
            torch.set_num_threads(self.threads)
        state = self._state  # one read: the whole call runs on one checkpoint even if a swap lands
        rows = []  # (request index, sample index, ids, params, seed, limit)
        for r, (ids, p) in enumerate(zip(prompts, params)):
            if len(ids) >= state.max_context:
                raise PromptTooLongError(prompt_tokens=len(ids), limit=state.max_context)
            limit = min(p.max_new_tokens, state.max_context - len(ids))
            for j, seed in enumerate(request_seeds(p)):
                rows.append((r, j, ids, p, seed, limit))

        outputs: dict[tuple[int, int], tuple[str, int, str, str | None]] = {}
        for group in self._groups(rows, state.max_context):
            for row, out in zip(group, self._generate_group(state, group)):
                outputs[(row[0], row[1])] = out

        results = []
        for r, (ids, p) in enumerate(zip(prompts, params)):
            samples = [outputs[(r, j)] for j in range(p.n)]
            results.append(GenerationResult(
                texts=[s[0] for s in samples],
                num_tokens=[s[1] for s in samples],
                finish_reasons=[s[2] for s in samples],
                prompt_tokens=len(ids),
                seeds=[row[4] for row in rows if row[0] == r],
                checkpoint=state.checkpoint,
                stop_tokens=[s[3] for s in samples],
                weight_version=state.version,
            ))
        return results

    def _groups(self, rows: list, max_context: int) -> list[list]:
        """Rows sorted by prompt length, cut so that each group fits the context and the row cap."""
        groups, current, width, steps = [], [], 0, 0
        for row in sorted(rows, key=lambda x: len(x[2])):
            w, s = max(width, len(row[2])), max(steps, row[5])
            if current and (len(current) >= self.max_batch_rows or w + s > max_context):
                groups.append(current)
                current, w, s = [], len(row[2]), row[5]
            current.append(row)
            width, steps = w, s
        if current:
            groups.append(current)
        return groups

    @torch.inference_mode()
    def _generate_group(self, state: _Loaded, group: list) -> list[tuple[str, int, str, str | None]]:
        width = max(len(row[2]) for row in group)
        steps = max(row[5] for row in group)
        input_ids = torch.full((len(group), width), state.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, row in enumerate(group):
            input_ids[i, width - len(row[2]):] = torch.tensor(row[2])
            mask[i, width - len(row[2]):] = 1
        eos = state.eos_ids[0] if state.eos_ids else None
        sampler = RowSampler(
            prompt_width=width,
            temperatures=[row[3].temperature for row in group],
            top_ps=[row[3].top_p for row in group],
            limits=[row[5] if row[5] < steps else -1 for row in group],  # rows at the cap stop by length
            generators=[torch.Generator().manual_seed(row[4]) if row[3].temperature > 0 else None
                        for row in group],
            eos_id=eos,
        )
        gen_cfg = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=steps, min_new_tokens=0,
            pad_token_id=state.pad_id, eos_token_id=list(state.eos_ids) or None,
            bos_token_id=state.tokenizer.bos_token_id,
        )
        out = state.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
            generation_config=gen_cfg, logits_processor=LogitsProcessorList([sampler]),
        )
        generated = out[:, width:].cpu().tolist()
        results = []
        eos_set = set(state.eos_ids)
        for row, toks in zip(group, generated):
            limit = row[5]
            stop_at = next((k for k, t in enumerate(toks) if t in eos_set), None)
            if stop_at is not None and stop_at < limit:
                text_ids, count, reason = toks[:stop_at], stop_at + 1, "stop"
                stop = state.tokenizer.convert_ids_to_tokens(toks[stop_at])
            else:  # reached its allowance (a forced end-of-sequence token is not part of the text)
                text_ids, count, reason, stop = toks[:limit], limit, "length", None
            text = state.tokenizer.decode(text_ids, skip_special_tokens=True)
            results.append((text, count, reason, stop))
        return results
