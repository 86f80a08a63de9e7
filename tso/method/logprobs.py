"""Sequence log-probs of responses under a causal LM (prompt and padding masked, EOS included).

Chosen and rejected answers of a batch of pairs go through the model in one concatenated forward
pass (chosen rows first). The LM head runs only on the positions that predict a response token,
so no full-vocabulary logits are materialised for prompt or padding positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SequenceBatch:
    """Padded (prompt + response) token ids; response_mask is True on response tokens."""

    input_ids: torch.Tensor  # [N, T] long
    attention_mask: torch.Tensor  # [N, T] long
    response_mask: torch.Tensor  # [N, T] bool
    position_ids: torch.Tensor  # [N, T] long

    def to(self, device) -> SequenceBatch:
        fields = (self.input_ids, self.attention_mask, self.response_mask, self.position_ids)
        return SequenceBatch(*(t.to(device) for t in fields))

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate_sequences(
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> SequenceBatch:
    """Pad prompt+response rows to one length. Position ids count real tokens only, so padding on either
    side gives the same log-probs as the unpadded sequence."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    if any(len(r) == 0 for r in responses):
        raise ValueError("a response has no tokens (it must contain at least the EOS token)")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt has no tokens: the first response token would have nothing to condition on")
    length = max(len(r) for r in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    response = torch.zeros((n, length), dtype=torch.bool)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        start = 0 if padding_side == "right" else length - len(row)
        input_ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, start : start + len(row)] = 1
        response[i, start + len(p) : start + len(row)] = True
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return SequenceBatch(input_ids, attention, response, positions)


def collate_pairs(
    prompts: list[list[int]],
    chosen: list[list[int]],
    rejected: list[list[int]],
    pad_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> SequenceBatch:
    """One batch of 2B rows: B (prompt, chosen) rows, then B (prompt, rejected) rows."""
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError("prompts, chosen and rejected must have the same length")
    return collate_sequences(list(prompts) * 2, list(chosen) + list(rejected), pad_id, padding_side, pad_to_multiple_of)


def _unwrap(model):
    return getattr(model, "module", model)  # DeepSpeed engines and DDP keep the model in .module


def _has_plain_head(model) -> bool:
    cfg = getattr(model, "config", None)
    plain = cfg is not None and not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) is None
    return plain and hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def sequence_logprobs(model, batch: SequenceBatch) -> torch.Tensor:
    """Sum of log p(token | prefix) over each row's response tokens; shape [N], float32."""
    model = _unwrap(model)
    ids, attn, resp = batch.input_ids, batch.attention_mask, batch.response_mask
    targets = ids[:, 1:]
    predict = resp[:, 1:]  # hidden state at t predicts token t+1
    if _has_plain_head(model):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=attn, position_ids=batch.position_ids).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][predict])  # [M, V], response positions only
    else:  # heads with soft-capping or scaling: use the model's own logits
        logits = model(input_ids=ids, attention_mask=attn, position_ids=batch.position_ids).logits[:, :-1][predict]
    token_logps = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets[predict].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(predict)[predict]
    out = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device)
    return out.index_add(0, rows, token_logps)


def pair_logprobs(model, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs of a batch made by collate_pairs."""
    logps = sequence_logprobs(model, batch)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


@torch.no_grad()
def slow_sequence_logprob(model, prompt: list[int], response: list[int]) -> float:
    """Reference implementation: one unpadded sequence, the model's full logits. For tests and checks."""
    model = _unwrap(model)
    ids = torch.tensor([list(prompt) + list(response)], dtype=torch.long, device=model.device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    logps = F.log_softmax(logits, dim=-1)
    total = 0.0
    for t in range(len(prompt) - 1, ids.shape[1] - 1):
        total += float(logps[t, ids[0, t + 1]])
    return total
