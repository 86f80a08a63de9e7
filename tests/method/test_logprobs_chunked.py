"""Chunked LM-head log-probs and padding-free packing equal the plain per-example computation.

A tiny random Llama with a large vocabulary (8192) and variable-length prompts and responses; forward
values and gradients are compared with one unpadded sequence at a time through the model's full logits."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import large_vocab_llama
from tso.method import logprobs as lp
from tso.method.logprobs import ChunkedTokenLogps, collate_pairs, head_token_logps, pack_rows, sequence_logprobs

VOCAB = 8192


@pytest.fixture(scope="module")
def model():
    m = large_vocab_llama(VOCAB, kv_heads=2, tied=False)
    m.eval()  # no dropout either way; eval keeps HF from warning about caches
    return m


def _pairs(n=5, seed=1):
    rng = random.Random(seed)

    def seq(lo, hi):
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    prompts = [seq(1, 30) for _ in range(n)]
    return prompts, [seq(1, 25) for _ in range(n)], [seq(1, 25) for _ in range(n)]


def _per_example(model, prompts, responses):
    """Plain reference with autograd: each sequence alone, unpadded, full logits, fp32 log_softmax."""
    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        logps = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        picked = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        out.append(picked[len(p) - 1:].sum())
    return torch.stack(out)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def reference(model):
    prompts, chosen, rejected = _pairs()
    weights = torch.linspace(0.5, 2.0, 2 * len(prompts))  # a generic upstream gradient per row
    model.zero_grad(set_to_none=True)
    values = _per_example(model, prompts + prompts, chosen + rejected)
    (values * weights).sum().backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return (prompts, chosen, rejected), weights, values.detach(), grads


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("keep", [0, 2**40], ids=["recompute", "keep-softmax"])
def test_chunked_and_packed_logprobs_and_grads_equal_per_example(model, reference, monkeypatch, side, pack, keep):
    (prompts, chosen, rejected), weights, values, grads = reference
    monkeypatch.setattr(lp, "LOGITS_CHUNK_BYTES", 4 * VOCAB * 7)  # 7 positions a chunk: many chunks, a ragged last
    monkeypatch.setattr(lp, "LOGITS_KEEP_BYTES", keep)
    batch = collate_pairs(prompts, chosen, rejected, pad_id=0, padding_side=side, pad_to_multiple_of=16)
    model.zero_grad(set_to_none=True)
    out = sequence_logprobs(model, batch, pack=pack)
    torch.testing.assert_close(out.detach(), values, atol=2e-4, rtol=1e-5)
    (out * weights).sum().backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    assert set(got) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(got[name], g, atol=2e-5, rtol=1e-4, msg=name)


def test_auto_packs_llama_and_matches_unpacked(model):
    assert lp.supports_packing(model)
    prompts, chosen, rejected = _pairs(seed=4)
    batch = collate_pairs(prompts, chosen, rejected, pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(model, batch), sequence_logprobs(model, batch, pack=False),
                                   atol=1e-4, rtol=0)


def test_chunked_token_logps_function_matches_log_softmax_with_bias_in_float64():
    torch.manual_seed(0)
    hidden = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    for keep in (0, 10**9):
        fn = lambda h, w, b, keep=keep: ChunkedTokenLogps.apply(h, w, b, targets, 4, keep)  # noqa: E731
        plain = F.log_softmax(F.linear(hidden, weight, bias), -1).gather(-1, targets[:, None]).squeeze(-1)
        torch.testing.assert_close(fn(hidden, weight, bias).float(), plain.float())
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_head_without_grad_keeps_nothing_and_plain_wrapper_is_used_for_non_linear_heads():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 300, bias=False)
    hidden, targets = torch.randn(20, 8), torch.randint(0, 300, (20,))
    plain = F.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(head_token_logps(head, hidden, targets, chunk_bytes=4 * 300 * 3), plain)

    class Scaled(torch.nn.Linear):  # a subclass with its own forward (e.g. a LoRA wrapper): not chunked
        def forward(self, x):
            return 2 * super().forward(x)

    scaled = Scaled(8, 300, bias=False)
    scaled.weight.data.copy_(head.weight.data)
    want = F.log_softmax(2 * head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(head_token_logps(scaled, hidden, targets, chunk_bytes=16), want)


def test_pack_rows_places_every_token_once_with_restarting_positions():
    prompts, chosen, rejected = _pairs(n=6, seed=7)
    for side in ("right", "left"):
        batch = collate_pairs(prompts, chosen, rejected, pad_id=0, padding_side=side)
        packed = pack_rows(batch)
        lengths = batch.attention_mask.sum(-1)
        assert packed.input_ids.shape[1] == int(lengths.max())
        assert packed.input_ids.shape[0] <= batch.input_ids.shape[0]
        attn = batch.attention_mask.bool()
        flat = packed.flat_index[attn]
        assert flat.unique().numel() == flat.numel() == int(lengths.sum())  # no token placed twice
        assert torch.equal(packed.input_ids.reshape(-1)[flat], batch.input_ids[attn])
        assert torch.equal(packed.position_ids.reshape(-1)[flat], batch.position_ids[attn])
        # every sequence starts at position 0, and so does each row's tail of padding
        from transformers.masking_utils import find_packed_sequence_indices

        segments = find_packed_sequence_indices(packed.position_ids)
        n_tails = int((packed.input_ids.numel() - flat.numel()) > 0)
        assert segments is None or int((segments[:, -1] + 1).sum()) >= 2 * len(prompts) + n_tails - 1
