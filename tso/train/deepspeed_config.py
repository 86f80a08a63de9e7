"""Derive the DeepSpeed config, the optimizer and the learning-rate schedule from a TrainConfig.

The optimizer is torch's AdamW handed to ``deepspeed.initialize`` (DeepSpeed's FusedAdam is not built for
CPU, and torch's fused CUDA AdamW needs no JIT build); ZeRO accepts it as a supported optimizer. The
schedule is a LambdaLR (linear warm-up, then cosine down to 0) that DeepSpeed steps after each optimizer
step and saves in its checkpoints. One optimizer and one schedule span all K x E epochs of a stage.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tso.config import OptimizerConfig, TrainConfig, deep_merge, deepspeed_conflicts


def grad_accum_steps(train: TrainConfig, world_size: int) -> int:
    per_step = train.micro_batch * world_size
    if train.global_batch % per_step:
        raise ValueError(
            f"train.global_batch ({train.global_batch}) must be a multiple of micro_batch x workers "
            f"({train.micro_batch} x {world_size})"
        )
    return train.global_batch // per_step


def generated_config(train: TrainConfig, world_size: int | None = None, use_gpu: bool | None = None) -> dict[str, Any]:
    """ZeRO stage, precision (bf16 with fp32 master weights on GPU, fp32 on CPU), batch sizes, clipping."""
    world = train.num_workers if world_size is None else world_size
    gpu = train.use_gpu if use_gpu is None else use_gpu
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage in (1, 2):
        zero.update(overlap_comm=gpu, contiguous_gradients=True, reduce_scatter=True)
    if train.zero_stage == 3:
        # the exported policy is gathered from the partitions (DeepSpeedBackend.full_state_dict)
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": grad_accum_steps(train, world),
        "gradient_clipping": train.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(gpu)},
        "fp16": {"enabled": False},
        # torch.optim.AdamW is on ZeRO's supported list; this only matters for other client optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def deepspeed_config(train: TrainConfig, world_size: int | None = None, use_gpu: bool | None = None) -> dict[str, Any]:
    """The generated config with ``train.deepspeed`` deep-merged over it. The config validated the override
    against ``train.num_workers``; the real world size (and device) is checked again here."""
    derived = generated_config(train, world_size, use_gpu)
    if not train.deepspeed:
        return derived
    problems = deepspeed_conflicts(train.deepspeed, derived)
    if problems:
        raise ValueError("; ".join(problems))
    return deep_merge(derived, train.deepspeed)


def offload_devices(ds: dict[str, Any]) -> tuple[bool, bool]:
    """(optimizer offloaded to CPU/NVMe, parameters offloaded) in a DeepSpeed config."""
    zero = ds.get("zero_optimization") or {}

    def off(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

    return off("offload_optimizer"), off("offload_param")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: norms and biases (1-D tensors) are not decayed."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, opt: OptimizerConfig, lr: float | None = None) -> torch.optim.Optimizer:
    cuda = next(model.parameters()).is_cuda
    kwargs: dict[str, Any] = {"fused": True} if cuda else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=lr or opt.lr, betas=tuple(opt.betas),
                             eps=1e-8, **kwargs)


class WarmupCosine:
    """LR factor at optimizer step s (0-based): linear warm-up over ``warmup`` steps, then cosine to 0 at
    ``total`` (or constant). A callable object, so LambdaLR's state_dict keeps it."""

    def __init__(self, warmup: int, total: int, schedule: str = "cosine"):
        self.warmup, self.total, self.schedule = int(warmup), max(int(total), 1), schedule

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / (self.warmup + 1)
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(opt: OptimizerConfig, total_steps: int) -> int:
    return math.ceil(opt.warmup_ratio * total_steps) if opt.warmup_ratio > 0 else 0


def build_scheduler(optimizer: torch.optim.Optimizer, opt: OptimizerConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_steps(opt, total_steps), total_steps, opt.schedule)
    )
