"""The loss names and the LossConfig fields each loss reads, kept free of torch so tso.config can import them.

tso.method.losses registers one function per name here; tests check that the two agree.
"""

from __future__ import annotations

from typing import Literal, get_args

LossType = Literal["dpo", "ipo", "cdpo", "dual_clip"]
LOSS_NAMES: tuple[str, ...] = get_args(LossType)

LOSS_SETTINGS: dict[str, tuple[str, ...]] = {
    "dpo": ("beta",),
    "ipo": ("beta", "ipo_tau", "ipo_normalize"),
    "cdpo": ("beta", "cdpo_eps"),
    "dual_clip": ("beta", "margin_pos", "margin_neg"),
}
