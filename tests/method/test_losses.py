"""The preference losses against closed-form values and their gradient behaviour."""

import math
import subprocess
import sys

import pytest
import torch

from tso.config import LossConfig
from tso.method.loss_names import LOSS_NAMES, LOSS_SETTINGS
from tso.method.losses import LOSSES, cdpo_loss, dpo_loss, dual_clip_loss, ipo_loss, loss_spec, preference_loss


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# Policy/reference log-probs chosen so that h_w = [1, -2], h_l = [-1, 3].
PC = torch.tensor([-10.0, -20.0])
RC = torch.tensor([-11.0, -18.0])
PR = torch.tensor([-13.0, -9.0])
RR = torch.tensor([-12.0, -12.0])
HW, HL = [1.0, -2.0], [-1.0, 3.0]


def test_dpo_closed_form():
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=0.1)
    z = [0.1 * (w - l) for w, l in zip(HW, HL)]  # [0.2, -0.5]
    expected = sum(-math.log(_sig(v)) for v in z) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["reward_chosen"].item() == pytest.approx(0.1 * (1 - 2) / 2)
    assert stats["reward_rejected"].item() == pytest.approx(0.1 * (-1 + 3) / 2)
    assert stats["margin"].item() == pytest.approx((0.2 - 0.5) / 2)
    assert stats["accuracy"].item() == pytest.approx(0.5)
    assert stats["grad_scale"].item() == pytest.approx((_sig(-0.2) + _sig(0.5)) / 2, rel=1e-6)


def test_ipo_closed_form_sum_and_mean():
    loss, _ = ipo_loss(PC, PR, RC, RR, tau=0.2)
    expected = sum((w - l - 2.5) ** 2 for w, l in zip(HW, HL)) / 2  # 1/(2*0.2) = 2.5
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    lw, ll = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 3.0])
    loss_mean, _ = ipo_loss(PC, PR, RC, RR, tau=0.2, chosen_lengths=lw, rejected_lengths=ll)
    expected_mean = ((1 / 2 - (-1) / 1 - 2.5) ** 2 + (-2 / 4 - 3 / 3 - 2.5) ** 2) / 2
    assert loss_mean.item() == pytest.approx(expected_mean, rel=1e-6)


def test_ipo_with_tau_equal_beta_is_openrlhf_convention():
    loss, _ = ipo_loss(PC, PR, RC, RR, tau=0.1)
    assert loss.item() == pytest.approx(sum((w - l - 5.0) ** 2 for w, l in zip(HW, HL)) / 2, rel=1e-6)


def test_cdpo_closed_form():
    loss, _ = cdpo_loss(PC, PR, RC, RR, beta=0.1, eps=0.3)
    z = [0.1 * (w - l) for w, l in zip(HW, HL)]
    expected = sum(-0.7 * math.log(_sig(v)) - 0.3 * math.log(_sig(-v)) for v in z) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_cdpo_eps_zero_is_dpo():
    a, _ = cdpo_loss(PC, PR, RC, RR, beta=0.1, eps=0.0)
    b, _ = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert a.item() == pytest.approx(b.item(), rel=1e-7)


def test_dual_clip_equals_dpo_when_no_clip_is_active():
    a, sa = dual_clip_loss(PC, PR, RC, RR, beta=0.1, margin_pos=20, margin_neg=10)
    b, _ = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert a.item() == pytest.approx(b.item(), rel=1e-7)
    assert sa["clip_frac_chosen"].item() == 0 and sa["clip_frac_rejected"].item() == 0


def test_dual_clip_closed_form_with_both_clips():
    # r_w = 0.1 * 300 = 30 > m_w = 20 ; r_l = 0.1 * -200 = -20 < -m_l = -10
    pc, rc = torch.tensor([-100.0]), torch.tensor([-400.0])
    pr, rr = torch.tensor([-500.0]), torch.tensor([-300.0])
    loss, stats = dual_clip_loss(pc, pr, rc, rr, beta=0.1, margin_pos=20, margin_neg=10)
    assert loss.item() == pytest.approx(-math.log(_sig(20 - (-10))), abs=1e-9)
    assert stats["clip_frac_chosen"].item() == 1.0 and stats["clip_frac_rejected"].item() == 1.0
    assert stats["reward_chosen"].item() == pytest.approx(30.0)
    assert stats["reward_rejected"].item() == pytest.approx(-20.0)


def _grads(fn, pc, pr, rc, rr, **kw):
    pc = pc.clone().requires_grad_(True)
    pr = pr.clone().requires_grad_(True)
    loss, _ = fn(pc, pr, rc, rr, **kw)
    loss.backward()
    return pc.grad, pr.grad


def test_dual_clip_rejected_gradient_is_zero_past_negative_margin():
    # pair 0: r_l = 0.1 * (-120) = -12 < -10 (clipped); pair 1: r_l = -0.5 (active)
    pc, rc = torch.tensor([-5.0, -5.0]), torch.tensor([-5.0, -5.0])
    pr, rr = torch.tensor([-130.0, -15.0]), torch.tensor([-10.0, -10.0])
    g_c, g_r = _grads(dual_clip_loss, pc, pr, rc, rr, beta=0.1, margin_pos=20, margin_neg=10)
    assert g_r[0].item() == 0.0
    assert g_r[1].item() > 0.0  # rejected still pushed down
    assert (g_c < 0).all()  # chosen still pushed up on both


def test_dual_clip_chosen_gradient_is_zero_past_positive_margin():
    pc, rc = torch.tensor([100.0, -5.0]), torch.tensor([-150.0, -6.0])  # r_w = 25 > 20 ; 0.1
    pr, rr = torch.tensor([-5.0, -5.0]), torch.tensor([-5.0, -5.0])
    g_c, g_r = _grads(dual_clip_loss, pc, pr, rc, rr, beta=0.1, margin_pos=20, margin_neg=10)
    assert g_c[0].item() == 0.0
    assert g_c[1].item() < 0.0
    assert (g_r > 0).all()


def test_dpo_gradient_scale_matches_autograd():
    pc, pr = _grads(dpo_loss, PC, PR, RC, RR, beta=0.1)
    _, stats = dpo_loss(PC, PR, RC, RR, beta=0.1)
    # d loss / d policy_chosen_i = -beta * sigma(r_l - r_w) / B
    assert (-pc * 2 / 0.1).mean().item() == pytest.approx(stats["grad_scale"].item(), rel=1e-6)


def test_gradient_scale_is_half_when_policy_equals_reference():
    x = torch.tensor([-3.0, -7.0, -1.5])
    for fn in (dpo_loss, cdpo_loss, dual_clip_loss):
        _, stats = fn(x, x + 1, x, x + 1)
        assert stats["grad_scale"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("fn", [dpo_loss, ipo_loss, cdpo_loss, dual_clip_loss])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_no_inf_or_nan_for_extreme_log_ratios(fn, sign):
    pc = torch.tensor([sign * 1e4, -sign * 1e4], requires_grad=True)
    pr = torch.tensor([-sign * 1e4, sign * 1e4], requires_grad=True)
    zero = torch.zeros(2)
    loss, stats = fn(pc, pr, zero, zero)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in stats.values())
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_preference_loss_dispatches_on_config():
    for kind, fn, kw in [
        ("dpo", dpo_loss, {"beta": 0.2}),
        ("cdpo", cdpo_loss, {"beta": 0.2, "eps": 0.1}),
        ("dual_clip", dual_clip_loss, {"beta": 0.2, "margin_pos": 0.3, "margin_neg": 0.1}),
        ("ipo", ipo_loss, {"beta": 0.2, "tau": 0.5}),
    ]:
        cfg = LossConfig(type=kind, beta=0.2, cdpo_eps=0.1, margin_pos=0.3, margin_neg=0.1, ipo_tau=0.5)
        a, _ = preference_loss(cfg, PC, PR, RC, RR)
        b, _ = fn(PC, PR, RC, RR, **kw)
        assert a.item() == pytest.approx(b.item())


FUNCTIONS = {"dpo": dpo_loss, "ipo": ipo_loss, "cdpo": cdpo_loss, "dual_clip": dual_clip_loss}
CONSTANTS = {"beta": 0.2, "cdpo_eps": 0.1, "margin_pos": 0.3, "margin_neg": 0.1, "ipo_tau": 0.5}
LW, LL = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 3.0])


def test_registry_lists_exactly_the_four_losses():
    assert list(LOSSES) == list(LOSS_NAMES) == ["dpo", "ipo", "cdpo", "dual_clip"]
    assert set(LOSS_SETTINGS) == set(LOSSES)
    assert {name: spec.fn for name, spec in LOSSES.items()} == FUNCTIONS


def test_registry_properties():
    assert all(spec.needs_reference for spec in LOSSES.values())
    assert [n for n, spec in LOSSES.items() if spec.has_clip_stats] == ["dual_clip"]
    for name, spec in LOSSES.items():
        for normalize in ("sum", "mean"):
            cfg = LossConfig(type=name, ipo_normalize=normalize)
            assert spec.needs_lengths(cfg) == (name == "ipo" and normalize == "mean")


def test_registry_settings_agree_with_the_torch_free_names():
    for name, spec in LOSSES.items():
        assert spec.settings == LOSS_SETTINGS[name]
        assert set(spec.settings) <= set(LossConfig.model_fields)


def test_clip_stats_only_where_the_registry_says():
    for name, spec in LOSSES.items():
        _, stats = preference_loss(LossConfig(type=name), PC, PR, RC, RR)
        assert ("clip_frac_chosen" in stats) == ("clip_frac_rejected" in stats) == spec.has_clip_stats


@pytest.mark.parametrize(
    "kind, normalize, kw",
    [
        ("dpo", "sum", {"beta": 0.2}),
        ("cdpo", "sum", {"beta": 0.2, "eps": 0.1}),
        ("dual_clip", "sum", {"beta": 0.2, "margin_pos": 0.3, "margin_neg": 0.1}),
        ("ipo", "sum", {"beta": 0.2, "tau": 0.5}),
        ("ipo", "mean", {"beta": 0.2, "tau": 0.5, "chosen_lengths": LW, "rejected_lengths": LL}),
    ],
)
def test_preference_loss_is_exactly_the_loss_function(kind, normalize, kw):
    cfg = LossConfig(type=kind, ipo_normalize=normalize, **CONSTANTS)
    a, sa = preference_loss(cfg, PC, PR, RC, RR, LW, LL)
    b, sb = FUNCTIONS[kind](PC, PR, RC, RR, **kw)
    assert torch.equal(a, b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_ipo_sum_ignores_lengths():
    cfg = LossConfig(type="ipo", ipo_normalize="sum")
    a, _ = preference_loss(cfg, PC, PR, RC, RR, LW, LL)
    b, _ = preference_loss(cfg, PC, PR, RC, RR)
    assert torch.equal(a, b)


def test_used_settings():
    cfg = dict(CONSTANTS, ipo_normalize="mean")
    assert LossConfig(type="dpo", **cfg).used_settings() == {"beta": 0.2}
    assert LossConfig(type="ipo", **cfg).used_settings() == {"beta": 0.2, "ipo_tau": 0.5, "ipo_normalize": "mean"}
    assert LossConfig(type="cdpo", **cfg).used_settings() == {"beta": 0.2, "cdpo_eps": 0.1}
    assert LossConfig(type="dual_clip", **cfg).used_settings() == {"beta": 0.2, "margin_pos": 0.3, "margin_neg": 0.1}
    assert LossConfig().used_settings() == {"beta": 0.1, "margin_pos": 20.0, "margin_neg": 10.0}


def test_unknown_loss_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown loss type 'kto'"):
        loss_spec("kto")


def test_no_import_circle_and_no_torch_in_config():
    for code in ("import sys, tso.config; assert 'torch' not in sys.modules and 'tso.method.losses' not in sys.modules",
                 "import sys, tso.method.losses; assert 'tso.config' not in sys.modules"):
        subprocess.run([sys.executable, "-c", code], check=True)
