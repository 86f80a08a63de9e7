"""Write a trained model as an ordinary Hugging Face model directory (weights, config, tokenizer) with a
``lineage.json`` that says where it came from. Written to a temporary name, then renamed into place.

A LoRA policy (a peft model) is written merged by default (``lora_export="merged"``: the base model's
keys with the adapters folded in, see tso.train.lora), so whatever loads policies needs no peft;
``"adapter"`` writes peft's adapter directory instead. Under ZeRO-3 the caller passes the state dict
gathered from the partitions (the module's own parameters are empty slices there)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tso.io import atomic_dir


def save_hf_model(module: torch.nn.Module, path: str | Path, tokenizer=None,
                  state_dict: dict[str, torch.Tensor] | None = None, lineage: dict[str, Any] | None = None,
                  lora_export: str = "merged") -> Path:
    """save_pretrained (safetensors) + tokenizer + lineage.json, into ``path`` atomically."""
    from tso.train.lora import is_peft, lora_scaling, merged_state_dict

    path = Path(path)
    module = getattr(module, "module", module)
    if is_peft(module):
        state = state_dict if state_dict is not None else module.state_dict()
        if lora_export == "adapter":
            state_dict = state  # peft's save_pretrained keeps the adapter keys of it
        elif lora_export == "merged":
            state_dict = merged_state_dict(state, lora_scaling(module))
            module = module.get_base_model()
        else:
            raise ValueError(f"lora_export must be 'merged' or 'adapter', got {lora_export!r}")
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    with atomic_dir(path) as tmp:
        module.save_pretrained(str(tmp), **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if lineage is not None:
            (tmp / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True), encoding="utf-8")
    return path


def lineage_record(*, base: str, stage: int, kind: str, data: str | None, config_hash: str | None,
                   **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,  # "policy" or "judge"
        "base": str(base),
        "stage": int(stage),
        "data": str(data) if data else None,
        "config_hash": config_hash,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
