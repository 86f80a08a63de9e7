"""Batched generation for evaluating tiny models: left padding, KV cache (Hugging Face ``generate``).

Prompts are sorted by length before batching (less padding), and results are returned in the
caller's order. Greedy decoding by default: the held-out score of a model is then one number,
not a sample; with ``temperature > 0`` sampling is seeded per batch (``seed``) and leaves the
caller's torch RNG alone.
"""

from __future__ import annotations

import torch

from tso.zoo.sft import chat_messages


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 128,
                     temperature: float = 0.0, seed: int = 0) -> list[str]:
    """The assistant's reply to each prompt (chat template, generation prompt added)."""
    model.eval()
    texts = [tokenizer.apply_chat_template(chat_messages(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str | None] = [None] * len(ids)
    pad = tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        T = max(len(ids[i]) for i in chunk)
        x = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, i in enumerate(chunk):  # left padding
            x[r, T - len(ids[i]):] = torch.tensor(ids[i])
            mask[r, T - len(ids[i]):] = 1
        kwargs = {"do_sample": False}
        if temperature > 0:
            kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        with torch.random.fork_rng(devices=[]):  # seeded sampling without touching the caller's RNG
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            seqs = model.generate(
                input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **kwargs,
            )
        for r, i in enumerate(chunk):
            out[i] = tokenizer.decode(seqs[r, T:], skip_special_tokens=True)
    return [o or "" for o in out]
