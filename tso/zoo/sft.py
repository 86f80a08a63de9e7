"""Supervised fine-tuning of a tiny model on chat-formatted toy tasks (loss on answer tokens only).

Kept small and CPU-friendly: examples are tokenised once, each step samples a batch with a seeded
generator, and batches are drawn from length-sorted mega-batches so little compute goes to padding.
AdamW with linear warm-up and cosine decay, gradient clipping at 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class SFTBudget:
    """How much one training run does. ``pool`` is how many distinct train-split tasks it may see."""

    steps: int
    batch: int
    lr: float
    pool: int
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    n_prompt: int  # tokens before the answer (user turn + "<|assistant|>"); the loss starts after


def chat_messages(prompt: str, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def encode_examples(tokenizer, tasks: Iterable[dict]) -> list[Example]:
    """Chat-template each (prompt, human answer); the answer and its EOS are the supervised part."""
    tasks = list(tasks)
    full = [tokenizer.apply_chat_template(chat_messages(t["prompt"], t["human"]), tokenize=False) for t in tasks]
    head = [tokenizer.apply_chat_template(chat_messages(t["prompt"]), tokenize=False, add_generation_prompt=True)
            for t in tasks]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    out = []
    for f, h, t in zip(full_ids, head_ids, tasks):
        if f[: len(h)] != h or f[-1] != tokenizer.eos_token_id:
            raise ValueError(f"chat template does not extend the prompt for task {t['id']}")
        out.append(Example(tuple(f), len(h)))
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on the prompt and the padding."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        row = torch.tensor(e.ids, dtype=torch.long)
        ids[i, :n] = row
        mask[i, :n] = 1
        labels[i, e.n_prompt:n] = row[e.n_prompt:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_schedule(n_examples: int, steps: int, batch: int, seed: int, lengths: list[int],
                   mega: int = 8) -> Iterable[list[int]]:
    """Indices of each step's batch: seeded, and length-sorted within mega-batches (less padding)."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        k = min(mega, steps - done)
        idx = torch.randint(0, n_examples, (k * batch,), generator=g).tolist()
        idx.sort(key=lambda i: lengths[i])
        chunks = [idx[j * batch:(j + 1) * batch] for j in range(k)]
        order = torch.randperm(k, generator=g).tolist()
        for j in order:
            yield chunks[j]
        done += k


def lr_at(step: int, budget: SFTBudget) -> float:
    if step < budget.warmup:
        return budget.lr * (step + 1) / budget.warmup
    span = max(1, budget.steps - budget.warmup)
    progress = min(1.0, (step - budget.warmup) / span)
    floor = budget.lr * budget.min_lr_ratio
    return floor + (budget.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def sft_train(model, examples: list[Example], budget: SFTBudget, seed: int, pad_id: int,
              on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train ``model`` in place for ``budget.steps`` steps; returns loss statistics."""
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": budget.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=budget.lr, betas=(0.9, 0.95),
    )
    lengths = [len(e.ids) for e in examples]
    losses: list[float] = []
    for step, idx in enumerate(batch_schedule(len(examples), budget.steps, budget.batch, seed, lengths)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, budget)
        batch = collate([examples[i] for i in idx], pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail), "steps": len(losses)}
