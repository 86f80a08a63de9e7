"""Tiny Llama-architecture models: the shape of a real checkpoint, small enough for CPU."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def tiny_llama_config(tokenizer: PreTrainedTokenizerBase, hidden: int = 64, layers: int = 2, heads: int = 4,
                      intermediate: int | None = None, max_positions: int = 1024) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or int(hidden * 8 / 3 // 8 * 8),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )


def random_tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **shape) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **shape))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_model_dir(model, tokenizer, path: str | Path) -> Path:
    """An ordinary Hugging Face model directory (safetensors, config, tokenizer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
