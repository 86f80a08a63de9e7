"""Length-grouped micro-batches and the batched reference pass change padding, not numbers.

Per-pair DPO losses and the step's gradient from length-grouped (and packed) micro-batches equal those
of the ungrouped, padded ones; the reference pass gives the same log-probs at any batch size."""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers import large_vocab_llama
from tso.config import LossConfig
from tso.method.logprobs import pair_logprobs
from tso.method.losses import preference_loss
from tso.train.data import TokenizedPair, collate_pair_batch, length_grouped_micro_batches
from tso.train.reference import reference_logprobs

VOCAB = 4096


@pytest.fixture(scope="module")
def model():
    return large_vocab_llama(VOCAB, kv_heads=4, tied=True)


def _pairs(n=12, seed=3) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def seq(lo, hi):
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    return sorted((TokenizedPair(f"p{i:03d}", seq(2, 40), seq(1, 30), seq(1, 30)) for i in range(n)),
                  key=lambda p: p.id)


def test_grouping_is_a_deterministic_partition_into_similar_lengths():
    pairs = _pairs()
    step = [7, 2, 9, 0, 11, 4, 5, 1]
    groups = length_grouped_micro_batches(pairs, step, 4)
    assert groups == length_grouped_micro_batches(pairs, list(reversed(step)), 4)  # a function of the content
    assert sorted(i for g in groups for i in g) == sorted(step) and all(len(g) == 4 for g in groups)
    assert max(pairs[i].num_tokens for i in groups[0]) <= min(pairs[i].num_tokens for i in groups[1])
    with pytest.raises(ValueError, match="does not split"):
        length_grouped_micro_batches(pairs, step[:6], 4)


def _per_pair_loss_and_step_grads(model, pairs, micro_batches, ref, pack):
    cfg = LossConfig(type="dpo", beta=0.1)
    model.zero_grad(set_to_none=True)
    per_pair: dict[str, float] = {}
    for part in micro_batches:
        batch = collate_pair_batch(pairs, part, pad_id=0)
        chosen, rejected = pair_logprobs(model, batch, pack=pack)
        rc = torch.tensor([ref[pairs[i].id][0] for i in part])
        rr = torch.tensor([ref[pairs[i].id][1] for i in part])
        for j, i in enumerate(part):  # each pair's own loss, alone
            one, _ = preference_loss(cfg, chosen[j:j + 1], rejected[j:j + 1], rc[j:j + 1], rr[j:j + 1])
            per_pair[pairs[i].id] = float(one.detach())
        loss, _ = preference_loss(cfg, chosen, rejected, rc, rr)
        (loss / len(micro_batches)).backward()  # what the engines do: mean per micro-batch / accumulation
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return per_pair, grads


def test_length_grouped_packed_micro_batches_give_the_ungrouped_losses_and_gradients(model):
    pairs = _pairs()
    step = [5, 0, 11, 3, 8, 1, 10, 6]
    # a reference that differs from the policy, so the DPO losses are not all log 2
    with torch.no_grad():
        ref = {p.id: (float(c) - 0.3 * k, float(r) + 0.2 * k) for k, (p, c, r) in
               enumerate(zip(pairs, *pair_logprobs(model, collate_pair_batch(pairs, range(len(pairs)), 0))))}
    plain = [step[i:i + 4] for i in range(0, len(step), 4)]
    grouped = length_grouped_micro_batches(pairs, step, 4)
    assert grouped != plain
    base_loss, base_grads = _per_pair_loss_and_step_grads(model, pairs, plain, ref, pack=False)
    for pack in (False, True):
        loss, grads = _per_pair_loss_and_step_grads(model, pairs, grouped, ref, pack=pack)
        assert loss.keys() == base_loss.keys()
        for pid in loss:
            assert loss[pid] == pytest.approx(base_loss[pid], abs=1e-5)
        for name, g in base_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_reference_pass_gives_the_same_logprobs_at_any_batch_size(model):
    pairs = _pairs()
    indices = list(range(len(pairs)))
    small = reference_logprobs(model, pairs, indices, pad_id=0, batch_pairs=1)
    large = reference_logprobs(model, pairs, indices, pad_id=0, batch_pairs=16)
    assert small.keys() == large.keys() == {p.id for p in pairs}
    for pid in small:
        assert large[pid] == pytest.approx(small[pid], abs=1e-4)
    assert model.training  # restored after the eval-mode pass
