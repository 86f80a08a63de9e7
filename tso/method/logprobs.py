"""Sequence log-probs of responses under a causal LM (prompt and padding masked, EOS included).

Chosen and rejected answers of a batch of pairs go through the model in one concatenated forward
pass (chosen rows first). The LM head runs only on the positions that predict a response token,
so no full-vocabulary logits are materialised for prompt or padding positions, and on those it runs
in chunks of positions (:class:`ChunkedTokenLogps`): each chunk's logits give the target's logit and
the logsumexp, so at most ``LOGITS_CHUNK_BYTES`` of fp32 logits exist at once, in the forward and in
the backward (which recomputes a chunk's logits unless they fitted in ``LOGITS_KEEP_BYTES``).

Padding-free packing (``pack``): the rows of a batch are packed first-fit into rows no longer than the
longest one, with position ids restarting at 0 for each sequence and no attention mask, which
transformers' mask utilities turn into a block-diagonal causal mask (sdpa, eager) or varlen
attention (flash-attention 2). Same values as the padded computation to float tolerance; the linear
layers then run on (almost) no padding.
"""

from __future__ import annotations

import importlib.util
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


# ----------------------------------------------------------------------------- chunked log-softmax

#: fp32 logits materialised at once by the chunked head (forward, and backward recomputation)
LOGITS_CHUNK_BYTES = 64 * 2**20
#: chunks whose softmax fits in this budget are kept from the forward for the backward (no recomputation)
LOGITS_KEEP_BYTES = 256 * 2**20


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    dev = weight.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


class ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] per position, ``chunk`` positions at a time.

    Forward: per chunk, logits (fp32), their logsumexp and the target's logit. Backward: per chunk,
    d/dlogits = g * (onehot(target) - softmax), from the kept softmax or from recomputed logits, then
    d/dhidden and d/dweight (accumulated in fp32). The matmuls run in the autocast dtype when autocast
    is on (as the plain head would), the softmax always in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, keep_bytes: int):
        dtype = _compute_dtype(weight)
        acc = torch.promote_types(dtype, torch.float32)  # the softmax runs in fp32 (fp64 for fp64 inputs)
        m, vocab = hidden.shape[0], weight.shape[0]
        out = torch.empty(m, dtype=acc, device=hidden.device)
        lse = torch.empty(m, dtype=acc, device=hidden.device)
        kept: list[torch.Tensor] = []
        kept_bytes = 0
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for s in range(0, m, chunk):
                e = min(s + chunk, m)
                logits = F.linear(h[s:e], w, b).to(acc)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                out[s:e] = logits.gather(-1, targets[s:e].unsqueeze(-1)).squeeze(-1) - chunk_lse
                lse[s:e] = chunk_lse
                if keep_bytes > 0:
                    if kept_bytes + (e - s) * vocab * 4 <= keep_bytes and len(kept) == s // chunk:
                        kept.append(logits.sub_(chunk_lse.unsqueeze(-1)).exp_())  # softmax, in place
                        kept_bytes += (e - s) * vocab * 4
        # the kept softmax chunks are saved like inputs: freed by the backward (unless the graph is retained)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, *kept)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse, *kept = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk, dtype = ctx.chunk, ctx.dtype
        m = hidden.shape[0]
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        grad_out = grad_out.to(acc)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for i, s in enumerate(range(0, m, chunk)):
                e = min(s + chunk, m)
                g = grad_out[s:e].unsqueeze(-1)
                if i < len(kept):  # not in place: a retained graph may run this backward again
                    dlogits = kept[i].mul(-g)
                else:
                    dlogits = F.linear(h[s:e], w, b).to(acc).sub_(lse[s:e].unsqueeze(-1)).exp_().mul_(-g)
                dlogits.scatter_add_(-1, targets[s:e].unsqueeze(-1), g)  # g * (onehot(target) - softmax)
                if need_b:
                    grad_b += dlogits.sum(0)
                d = dlogits.to(dtype)
                if need_h:
                    torch.mm(d, w, out=grad_h[s:e])
                if need_w:
                    if dtype == acc:
                        grad_w.addmm_(d.t(), h[s:e])
                    else:
                        grad_w += (d.t() @ h[s:e]).to(acc)
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def _chunkable_head(head) -> bool:
    """A plain nn.Linear whose weight is all here (not a peft/LoRA wrapper, not a ZeRO-3 partition)."""
    return (isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward
            and not hasattr(head.weight, "ds_id"))


def head_token_logps(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_bytes: int | None = None,
                     keep_bytes: int | None = None) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` [M, H] under the LM head, without [M, V] logits at once."""
    chunk_bytes = LOGITS_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    keep_bytes = LOGITS_KEEP_BYTES if keep_bytes is None else keep_bytes
    if not _chunkable_head(head):  # e.g. a ZeRO-3 partitioned head: its module call gathers the weight
        logits = head(hidden).float()
        return torch.gather(F.log_softmax(logits, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)
    chunk = max(1, chunk_bytes // (4 * head.weight.shape[0]))
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    return ChunkedTokenLogps.apply(hidden, head.weight, head.bias, targets, chunk, keep_bytes if grad else 0)


# ----------------------------------------------------------------------------- packing

#: model types whose transformers implementation builds its masks with masking_utils (packed position ids
#: are honoured: block-diagonal causal attention); others are run padded
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "smollm3", "olmo2", "granite",
                                  "phi3"})
PACKABLE_ATTENTION = frozenset({"sdpa", "eager", "flash_attention_2", "flash_attention_3"})


def supports_packing(model) -> bool:
    model = _unwrap(model)
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in PACKABLE_MODEL_TYPES or not _has_plain_head(model):
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    # the model's own library must be new enough to honour packed position ids (asked, not imported:
    # the method layer stays free of transformers)
    if importlib.util.find_spec("transformers.masking_utils") is None:
        return False
    return getattr(cfg, "_attn_implementation", None) in PACKABLE_ATTENTION


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # [R, C]
    position_ids: torch.Tensor  # [R, C]: 0.. per sequence; the tail padding of a row is a sequence of its own
    flat_index: torch.Tensor  # [N, T]: where token (n, t) of the padded batch sits in the flattened [R * C]


def pack_rows(batch: SequenceBatch, pad_id: int = 0) -> PackedRows:
    """First-fit-decreasing packing of the batch's rows into rows as long as the longest one."""
    attn = batch.attention_mask.bool()
    lengths = attn.sum(-1).tolist()
    capacity = max(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[int] = []
    place = [(0, 0)] * len(lengths)  # row -> (bin, offset)
    for i in order:
        for b, room in enumerate(free):
            if room >= lengths[i]:
                place[i] = (b, capacity - room)
                free[b] = room - lengths[i]
                break
        else:
            place[i] = (len(free), 0)
            free.append(capacity - lengths[i])
    device = batch.input_ids.device
    base = torch.tensor([b * capacity + o for b, o in place], dtype=torch.long, device=device)
    positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
    flat_index = base.unsqueeze(-1) + positions
    n_bins = len(free)
    ids = torch.full((n_bins * capacity,), pad_id, dtype=torch.long, device=device)
    ids[flat_index[attn]] = batch.input_ids[attn]
    # the tail of each bin counts 0, 1, ...: a sequence of its own, so no real token attends to it
    tail_start = torch.tensor([capacity - room for room in free], dtype=torch.long, device=device)
    pos = (torch.arange(capacity, device=device).unsqueeze(0) - tail_start.unsqueeze(-1)).reshape(-1)
    pos[flat_index[attn]] = positions[attn]
    return PackedRows(ids.view(n_bins, capacity), pos.view(n_bins, capacity), flat_index)


def sequence_logprobs(model, batch: SequenceBatch, pack: bool | None = None) -> torch.Tensor:
    """Sum of log p(token | prefix) over each row's response tokens; shape [N], float32.

    ``pack``: None packs when :func:`supports_packing` says the model honours packed position ids."""
    model = _unwrap(model)
    ids, attn, resp = batch.input_ids, batch.attention_mask, batch.response_mask
    targets = ids[:, 1:]
    predict = resp[:, 1:]  # hidden state at t predicts token t+1
    if _has_plain_head(model):
        if pack is None:
            pack = supports_packing(model)
        decoder = model.get_decoder()
        if pack:
            packed = pack_rows(batch)
            hidden = decoder(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                             use_cache=False).last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1])[packed.flat_index[:, :-1][predict]]
        else:
            hidden = decoder(input_ids=ids, attention_mask=attn, position_ids=batch.position_ids,
                             use_cache=False).last_hidden_state[:, :-1][predict]
        token_logps = head_token_logps(model.get_output_embeddings(), hidden, targets[predict])
    else:  # heads with soft-capping or scaling: use the model's own logits
        logits = model(input_ids=ids, attention_mask=attn, position_ids=batch.position_ids,
                       use_cache=False).logits[:, :-1][predict]
        token_logps = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets[predict].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(predict)[predict]
    out = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device)
    return out.index_add(0, rows, token_logps)


def pair_logprobs(model, batch: SequenceBatch, pack: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs of a batch made by collate_pairs."""
    logps = sequence_logprobs(model, batch, pack)
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
