"""The reference hot-swap (docs/method.md section 4).

At a mini-batch boundary the reference becomes the current policy, so the reference log-probs of the
next mini-batch are computed by the policy itself, in eval mode and without gradients, once, before
training on it. No second model stays in memory, and no reference forward runs inside the steps.
Each worker computes a share of the mini-batch; the results are gathered so every worker holds them
all (a few floats per pair), whatever slice of each step it later trains on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from tso.method.logprobs import pair_logprobs
from tso.train import dist
from tso.train.data import TokenizedPair, collate_pair_batch, length_sorted_chunks

RefLogps = dict[str, tuple[float, float]]  # pair id -> (chosen, rejected) summed response log-probs


@torch.no_grad()
def reference_logprobs(module, pairs: Sequence[TokenizedPair], indices: Sequence[int], pad_id: int,
                       batch_pairs: int, autocast_dtype: torch.dtype | None = None) -> RefLogps:
    """Log-probs of ``pairs[indices]`` under ``module`` in eval mode; sharded over workers, then gathered."""
    world = dist.world_size()
    mine = list(indices)[dist.rank():: world]
    chunks = length_sorted_chunks(pairs, mine, batch_pairs)
    # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in each one)
    per_rank = math.ceil(math.ceil(len(indices) / world) / batch_pairs)
    padding = per_rank - len(chunks)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    out: RefLogps = {}

    def forward(chunk):
        batch = collate_pair_batch(pairs, chunk, pad_id).to(device)
        if autocast_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                return pair_logprobs(module, batch)
        return pair_logprobs(module, batch)

    try:
        for chunk in chunks:
            chosen, rejected = forward(chunk)
            for i, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                out[pairs[i].id] = (c, r)
        for _ in range(padding):
            forward([indices[0]])  # results discarded
    finally:
        module.train(was_training)
    merged: RefLogps = {}
    for part in dist.all_gather_object(out):
        merged.update(part)
    missing = [pairs[i].id for i in indices if pairs[i].id not in merged]
    if missing:
        raise RuntimeError(f"reference pass lost {len(missing)} pairs (e.g. {missing[:3]})")
    return merged


def timed_reference(module, pairs, indices, pad_id, batch_pairs, autocast_dtype=None) -> tuple[RefLogps, float]:
    t0 = time.perf_counter()
    ref = reference_logprobs(module, pairs, indices, pad_id, batch_pairs, autocast_dtype)
    return ref, time.perf_counter() - t0


def lookup(ref: RefLogps, pairs: Sequence[TokenizedPair], indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    vals = [ref[pairs[i].id] for i in indices]
    return (torch.tensor([v[0] for v in vals], dtype=torch.float32),
            torch.tensor([v[1] for v in vals], dtype=torch.float32))
