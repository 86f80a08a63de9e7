"""Preference losses (docs/method.md section 5): tensors in, (loss, stats) out.

Each function takes the summed response log-probs of the policy and the reference for the chosen
(w) and rejected (l) answers, shape [B], and returns the mean loss and a dict of detached scalar
statistics. With h = log pi_theta - log pi_ref and r = beta * h:

    DPO        L = -log sigmoid(r_w - r_l)
    IPO        L = (h_w - h_l - 1/(2 tau))^2
    cDPO       L = -(1-eps) log sigmoid(r_w - r_l) - eps log sigmoid(r_l - r_w)
    dual clip  L = -log sigmoid(min(r_w, m_w) - max(r_l, -m_l))

LOSSES registers each name of tso.method.loss_names with what it needs, so no caller compares loss names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Stats = dict[str, torch.Tensor]


def _stats(r_w: torch.Tensor, r_l: torch.Tensor, loss: torch.Tensor) -> Stats:
    r_w, r_l = r_w.detach(), r_l.detach()
    return {
        "loss": loss.detach(),
        "reward_chosen": r_w.mean(),
        "reward_rejected": r_l.mean(),
        "margin": (r_w - r_l).mean(),
        "accuracy": (r_w > r_l).float().mean(),
        # d(-log sigmoid(r_w - r_l)) / d(r_w - r_l) = -sigmoid(r_l - r_w): the per-pair gradient scale.
        "grad_scale": torch.sigmoid(r_l - r_w).mean(),
    }


def _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    return beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Stats]:
    """Sigmoid DPO (paper eq. 11)."""
    r_w, r_l = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    loss = -F.logsigmoid(r_w - r_l).mean()
    return loss, _stats(r_w, r_l, loss)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    tau: float = 0.2,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """IPO (paper eq. 12). beta only scales the reported rewards; pass lengths to average per token."""
    h_w = policy_chosen - ref_chosen
    h_l = policy_rejected - ref_rejected
    if chosen_lengths is not None and rejected_lengths is not None:
        h_w = h_w / chosen_lengths.clamp(min=1)
        h_l = h_l / rejected_lengths.clamp(min=1)
    loss = ((h_w - h_l - 1.0 / (2.0 * tau)) ** 2).mean()
    return loss, _stats(beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected), loss)


def cdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    eps: float = 0.3,
) -> tuple[torch.Tensor, Stats]:
    """Conservative DPO with label smoothing eps (paper eq. 13)."""
    r_w, r_l = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    z = r_w - r_l
    loss = (-(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    return loss, _stats(r_w, r_l, loss)


def dual_clip_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    margin_pos: float = 20.0,
    margin_neg: float = 10.0,
) -> tuple[torch.Tensor, Stats]:
    """Dual clip reward loss (paper eq. 10, reconstructed): stop pushing a side once past its margin."""
    r_w, r_l = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    loss = -F.logsigmoid(torch.clamp(r_w, max=margin_pos) - torch.clamp(r_l, min=-margin_neg)).mean()
    stats = _stats(r_w, r_l, loss)
    stats["clip_frac_chosen"] = (r_w.detach() > margin_pos).float().mean()
    stats["clip_frac_rejected"] = (r_l.detach() < -margin_neg).float().mean()
    return loss, stats


@dataclass(frozen=True)
class LossSpec:
    """What a loss takes and gives, so callers ask the registry instead of comparing loss names."""

    fn: Callable[..., tuple[torch.Tensor, Stats]]
    args: dict[str, str]  # keyword of fn -> the LossConfig field that supplies it
    needs_reference: bool
    has_clip_stats: bool = False
    per_token_setting: str | None = None  # the LossConfig field whose value "mean" asks for response lengths

    @property
    def settings(self) -> tuple[str, ...]:
        """The LossConfig fields this loss reads; the rest of LossConfig is inert for it."""
        extra = (self.per_token_setting,) if self.per_token_setting else ()
        return (*self.args.values(), *extra)

    def needs_lengths(self, cfg) -> bool:
        """Lengths only matter when the loss averages its log-ratios per token."""
        return self.per_token_setting is not None and getattr(cfg, self.per_token_setting) == "mean"


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, {"beta": "beta"}, needs_reference=True),
    "ipo": LossSpec(ipo_loss, {"beta": "beta", "tau": "ipo_tau"}, needs_reference=True, per_token_setting="ipo_normalize"),
    "cdpo": LossSpec(cdpo_loss, {"beta": "beta", "eps": "cdpo_eps"}, needs_reference=True),
    "dual_clip": LossSpec(
        dual_clip_loss, {"beta": "beta", "margin_pos": "margin_pos", "margin_neg": "margin_neg"},
        needs_reference=True, has_clip_stats=True,
    ),
}


def loss_spec(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss type {name!r} (have {sorted(LOSSES)})") from None


def preference_loss(
    cfg,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """Dispatch on a LossConfig (tso.config): the one place that maps settings onto loss arguments."""
    spec = loss_spec(cfg.type)
    kwargs = {arg: getattr(cfg, field) for arg, field in spec.args.items()}
    if spec.needs_lengths(cfg):
        kwargs.update(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    return spec.fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **kwargs)
