"""LoRA adapters (``train.lora``, via peft) and how an adapted policy leaves training.

The policy is ``peft.get_peft_model(base, LoraConfig(...))``: only the adapters require gradients, so
the optimizer (``deepspeed_config.param_groups``) holds adapter parameters only and the base weights
stay frozen. The reference hot-swap needs nothing special: at a boundary the reference log-probs are
computed by the current policy, adapters active, as for full fine-tuning.

Exports are computed from a state dict (``module.state_dict()``, or under ZeRO-3 the one gathered from
the partitions), never by merging in place, so training can go on after a boundary export:
``merged_state_dict`` folds W + (alpha / r) B A into ordinary base-model keys (an HF directory that
loads with ``from_pretrained`` and needs no peft to serve), or peft's own adapter directory.
"""

from __future__ import annotations

from typing import Any

import torch

ADAPTER = "default"  # peft's name for the one adapter tso trains
PEFT_PREFIX = "base_model.model."


def is_peft(module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def peft_lora_config(settings):
    """peft's LoraConfig from ``train.lora`` (tso.config.LoraSettings)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_modules, bias="none", task_type="CAUSAL_LM")


def apply_lora(model: torch.nn.Module, settings, seed: int) -> torch.nn.Module:
    """Wrap ``model`` with trainable LoRA adapters; every other parameter is frozen. The adapters' random
    initialisation is drawn from ``seed`` (every worker, and every backend, starts from the same adapters),
    without touching the process's RNG. Only ``nn.Linear`` targets: the merge below is the Linear one."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_lora_config(settings))
    bad = sorted({type(m.get_base_layer()).__name__ for m in lora_layers(peft_model)
                  if not isinstance(m.get_base_layer(), torch.nn.Linear)})
    if bad:
        raise ValueError(f"train.lora.target_modules: adapters on {bad} layers are not supported (only Linear); "
                         "name Linear layers such as q_proj, v_proj")
    if not lora_layers(peft_model):
        raise ValueError(f"train.lora.target_modules = {settings.target_modules!r} matched no layer of the model")
    return peft_model


def lora_layers(module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def lora_scaling(module) -> float:
    """alpha / r of the trained adapter (rsLoRA's alpha / sqrt(r) when peft's config says so)."""
    cfg = module.peft_config[ADAPTER]
    return cfg.lora_alpha / (cfg.r ** 0.5 if getattr(cfg, "use_rslora", False) else cfg.r)


def base_key(key: str) -> str:
    """A peft state-dict key as the base model's own: ``base_model.model.`` and ``.base_layer`` dropped."""
    return key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The base model's weights with each adapter folded in: W + scaling * (B @ A), computed in fp32 and
    stored in W's dtype. Adapter tensors are dropped, so the keys are the base model's."""
    a_suffix, b_suffix = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        out[base_key(key)] = value
    for key, a in state.items():
        if not key.endswith(a_suffix):
            continue
        stem = key[: -len(a_suffix)]
        b = state[stem + b_suffix]
        target = base_key(stem + ".base_layer.weight")
        w = out[target]
        out[target] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return out


def trainable_summary(module) -> dict[str, Any]:
    def numel(p) -> int:
        return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partition holds a slice; ds_numel is the whole

    trainable = sum(numel(p) for p in module.parameters() if p.requires_grad)
    total = sum(numel(p) for p in module.parameters())
    return {"trainable_params": int(trainable), "total_params": int(total)}
