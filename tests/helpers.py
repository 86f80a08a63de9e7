"""What several test modules share: the repository root, tiny model directories, a tiny judge overfit
to known answers and a Serve app on a port of the module's own."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch

from tso.method.judging import render_judge_prompt

REPO = Path(__file__).resolve().parents[1]

# A judge overfit (in seconds) to answer per dimension, so that score parsing is tested on real output.
JUDGE_RUBRICS = {"correctness": "A: rate correctness.", "conciseness": "B: rate conciseness."}
JUDGE_ANSWERS = {"correctness": "Evaluation evidence: ok Score: 7.0",
                 "conciseness": "Evaluation evidence: short Score: 3.0"}
_CACHE: dict[str, Path] = {}


def train_tiny_judge(root: Path, tokenizer, steps: int = 160) -> Path:
    """A tiny Llama fine-tuned on judge prompts to always answer JUDGE_ANSWERS[dimension] (then EOS).
    Cached per session (pass a session-lifetime directory)."""
    if "judge" in _CACHE:
        return _CACHE["judge"]
    from tso.zoo.tiny import random_tiny_llama, save_model_dir

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    model = random_tiny_llama(tokenizer, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def example():
        dim = rng.choice(sorted(JUDGE_RUBRICS))
        q = "".join(rng.choice("abcdefgh 0123") for _ in range(rng.randint(1, 24)))
        a = "".join(rng.choice("xyz 456") for _ in range(rng.randint(0, 24)))
        text = tokenizer.apply_chat_template([{"role": "user", "content": render_judge_prompt(JUDGE_RUBRICS[dim], q, a)}],
                                             tokenize=False, add_generation_prompt=True)
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
        return p, tokenizer(JUDGE_ANSWERS[dim], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    for _ in range(steps):
        batch = [example() for _ in range(16)]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((16, width), tokenizer.pad_token_id)
        labels = torch.full((16, width), -100)
        mask = torch.zeros((16, width), dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p) + len(a)] = 1
            labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    _CACHE["judge"] = save_model_dir(model, tokenizer, root / "tiny-judge")
    return _CACHE["judge"]


def tiny_model_dirs(root: Path, tokenizer, seeds: dict[str, int]) -> dict[str, str]:
    """Random tiny Llamas, one per name (its seed decides the weights), saved as HF directories."""
    from tso.zoo.tiny import random_tiny_llama, save_model_dir

    return {name: str(save_model_dir(random_tiny_llama(tokenizer, seed=seed), tokenizer, root / name))
            for name, seed in seeds.items()}


@contextlib.contextmanager
def served_app(cfg, port: int):
    """``cfg``'s app deployed on Serve at 127.0.0.1:``port``, deleted afterwards. Serve's HTTP port is
    fixed once Serve starts, so Serve is restarted on this port first."""
    from ray import serve

    from tso.serving.app import deploy

    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(cfg, port=port)
    try:
        yield cfg
    finally:
        serve.delete(cfg.serve.app_name)
        serve.shutdown()


def model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved model directory (one safetensors file: the tiny models' layout)."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two models' weights (the same keys, or the test fails)."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def large_vocab_llama(vocab: int, kv_heads: int = 4, tied: bool = False):
    """A 2-layer Llama whose vocabulary dwarfs its width, so the LM head's log-probs dominate (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv_heads,
                                        max_position_embeddings=256, tie_word_embeddings=tied))
