"""Batched sequence log-probs against a slow per-example computation on a tiny random Llama."""

import pytest
import torch

from tso.method import logprobs as lp
from tso.method.logprobs import (
    collate_pairs,
    collate_sequences,
    pair_logprobs,
    sequence_logprobs,
    slow_sequence_logprob,
)
from tso.zoo.tiny import random_tiny_llama


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    m = random_tiny_llama(tiny_tokenizer, seed=3, hidden=48, layers=2, heads=4)
    m.eval()
    return m


def _examples(tok):
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in ["add 2 and 3", "reverse: héllo wörld", "x"]
    ]
    prompts = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    chosen = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in ["5", "dlröw olléh", "yes indeed"]]
    rejected = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in ["six!", "no", "日本語の答え"]]
    return prompts, chosen, rejected


@pytest.mark.parametrize("side", ["right", "left"])
def test_pair_logprobs_equal_slow_per_example(model, tiny_tokenizer, side):
    prompts, chosen, rejected = _examples(tiny_tokenizer)
    batch = collate_pairs(prompts, chosen, rejected, tiny_tokenizer.pad_token_id, padding_side=side)
    assert batch.input_ids.shape[0] == 6
    with torch.no_grad():
        c, r = pair_logprobs(model, batch)
    for i in range(3):
        assert c[i].item() == pytest.approx(slow_sequence_logprob(model, prompts[i], chosen[i]), abs=1e-4)
        assert r[i].item() == pytest.approx(slow_sequence_logprob(model, prompts[i], rejected[i]), abs=1e-4)


def test_padding_side_and_extra_padding_do_not_change_values(model, tiny_tokenizer):
    prompts, chosen, _ = _examples(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        a = sequence_logprobs(model, collate_sequences(prompts, chosen, pad, "right"))
        b = sequence_logprobs(model, collate_sequences(prompts, chosen, pad, "left", pad_to_multiple_of=32))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_response_mask_covers_response_and_eos_only(tiny_tokenizer):
    prompts, chosen, _ = _examples(tiny_tokenizer)
    batch = collate_sequences(prompts, chosen, tiny_tokenizer.pad_token_id, "left")
    assert batch.response_lengths.tolist() == [len(c) for c in chosen]
    for i in range(3):
        ids = batch.input_ids[i][batch.response_mask[i]].tolist()
        assert ids == chosen[i] and ids[-1] == tiny_tokenizer.eos_token_id


def test_fast_head_matches_full_logits_path(model, tiny_tokenizer, monkeypatch):
    prompts, chosen, rejected = _examples(tiny_tokenizer)
    batch = collate_pairs(prompts, chosen, rejected, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        fast = sequence_logprobs(model, batch)
        monkeypatch.setattr(lp, "_has_plain_head", lambda m: False)
        full = sequence_logprobs(model, batch)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)


def test_gradients_flow_to_the_model(model, tiny_tokenizer):
    prompts, chosen, rejected = _examples(tiny_tokenizer)
    batch = collate_pairs(prompts, chosen, rejected, tiny_tokenizer.pad_token_id)
    model.zero_grad()
    c, r = pair_logprobs(model, batch)
    (c - r).sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_collate_rejects_empty_response_and_mismatch(tiny_tokenizer):
    with pytest.raises(ValueError, match="response has no tokens"):
        collate_sequences([[1, 2]], [[]], 0)
    with pytest.raises(ValueError, match="same length"):
        collate_pairs([[1]], [[2]], [], 0)
    with pytest.raises(ValueError, match="padding_side"):
        collate_sequences([[1]], [[2]], 0, padding_side="middle")
