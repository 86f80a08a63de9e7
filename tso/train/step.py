"""One optimizer step of preference training: micro-batches in, averaged statistics out.

Per micro-batch: one concatenated chosen+rejected forward (tso.method.logprobs.pair_logprobs), the
configured loss (tso.method.losses.preference_loss) against reference log-probs that were computed
before the mini-batch started (the hot-swap) or, in frozen-copy mode, by a second model now.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from tso.method.logprobs import SequenceBatch, pair_logprobs
from tso.method.losses import loss_spec, preference_loss
from tso.train import dist
from tso.train.backend import TrainBackend


@dataclass
class MicroBatch:
    batch: SequenceBatch  # collate_pairs: B chosen rows, then B rejected rows
    ref_chosen: torch.Tensor | None  # [B]; None: the reference model computes them now
    ref_rejected: torch.Tensor | None

    @property
    def num_pairs(self) -> int:
        return self.batch.input_ids.shape[0] // 2


def autocast(backend: TrainBackend):
    dtype = getattr(backend, "autocast_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=backend.device.type, dtype=dtype)


def micro_batch_loss(module, mb: MicroBatch, loss_cfg, ref_module=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    spec = loss_spec(loss_cfg.type)
    batch = mb.batch
    ref_chosen, ref_rejected = mb.ref_chosen, mb.ref_rejected
    if spec.needs_reference and ref_chosen is None:
        if ref_module is None:
            raise ValueError("a micro-batch without reference log-probs needs a reference model")
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_logprobs(ref_module, batch)
    policy_chosen, policy_rejected = pair_logprobs(module, batch)
    chosen_lengths = rejected_lengths = None
    if spec.needs_lengths(loss_cfg):
        lengths = batch.response_lengths
        half = lengths.shape[0] // 2
        chosen_lengths, rejected_lengths = lengths[:half].float(), lengths[half:].float()
    loss, stats = preference_loss(loss_cfg, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                  chosen_lengths, rejected_lengths)
    stats["logp_chosen"] = policy_chosen.detach().mean()
    stats["logp_rejected"] = policy_rejected.detach().mean()
    return loss, stats


def train_step(backend: TrainBackend, micro_batches: list[MicroBatch], loss_cfg, ref_module=None) -> dict[str, float]:
    """Forward/backward each micro-batch, then the optimizer step. Statistics are means over this step's
    micro-batches and over workers; tokens and pairs are sums over workers."""
    if len(micro_batches) != backend.grad_accum:
        raise ValueError(f"a step needs {backend.grad_accum} micro-batches per worker, got {len(micro_batches)}")
    t0 = time.perf_counter()
    device = backend.device
    lr = backend.lr()
    per_micro: list[dict[str, torch.Tensor]] = []
    tokens = pairs = 0
    backend.train()
    for mb in micro_batches:
        mb = MicroBatch(mb.batch.to(device),
                        None if mb.ref_chosen is None else mb.ref_chosen.to(device),
                        None if mb.ref_rejected is None else mb.ref_rejected.to(device))
        with autocast(backend):
            loss, stats = micro_batch_loss(backend.module, mb, loss_cfg, ref_module)
        backend.backward(loss)
        backend.step()
        per_micro.append(stats)
        tokens += mb.batch.num_tokens
        pairs += mb.num_pairs
    keys = sorted(per_micro[0])
    means = torch.stack([torch.stack([s[k].float() for k in keys]) for s in per_micro]).mean(0)
    means = dist.all_reduce_mean(means.cpu() if device.type == "cpu" else means)
    counts = dist.all_reduce_sum(torch.tensor([tokens, pairs], dtype=torch.float64, device=means.device))
    out = {k: float(v) for k, v in zip(keys, means.tolist())}
    norm = backend.grad_norm()
    out.update(grad_norm=norm, lr=lr, tokens=int(counts[0]), pairs=int(counts[1]))
    elapsed = time.perf_counter() - t0
    out.update(step_time_s=elapsed, pairs_per_s=out["pairs"] / elapsed, tokens_per_s=out["tokens"] / elapsed)
    return out
