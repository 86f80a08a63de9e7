"""Importing a GGUF checkpoint as an ordinary Hugging Face model directory.

transformers dequantises GGUF on load but refuses to save the result (it still carries the gguf
quantization config), so the weights move into a fresh, unquantised model of the same config.
"""

from __future__ import annotations

import json
from pathlib import Path

from tso.io import atomic_dir, file_digest

GGUF_MAGIC = b"GGUF"
DTYPES = ("float32", "bfloat16", "float16")
INSTALL_HINT = "pip install 'tso[gguf]'"


def require_gguf() -> None:
    """Fail early with the fix, before transformers fails deep inside with its own message."""
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError(f"reading GGUF files needs the gguf package: {INSTALL_HINT}") from e


def check_gguf_file(gguf_file: str | Path) -> Path:
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    return path


def torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load_gguf(gguf_file: str | Path):
    """The dequantised float32 model (serialisable) and its tokenizer."""
    require_gguf()
    path = check_gguf_file(gguf_file)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return unquantise(quantised), tokenizer


def unquantise(model):
    """A plain model holding the same weights: `save_pretrained` refuses anything tagged gguf."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def save_model_dir(model, tokenizer, out_dir: str | Path, dtype: str = "float32", extra: dict | None = None) -> Path:
    """Save atomically: a reader never sees a half-written directory. Casts `model` in place.

    `extra` maps file names to JSON-able objects written beside the weights.
    """
    out = Path(out_dir).expanduser()
    target = torch_dtype(dtype)

    def write(tmp: Path) -> None:
        model.to(target)
        model.config.dtype = target
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")

    with atomic_dir(out) as tmp:
        write(tmp)
    return out


def import_record(gguf_file: Path, dtype: str) -> dict:
    import transformers

    return {"source": gguf_file.name, "sha256": file_digest(gguf_file), "dtype": dtype,
            "transformers": transformers.__version__}


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert a GGUF checkpoint into a Hugging Face model directory that `from_pretrained` loads."""
    torch_dtype(dtype)
    path = check_gguf_file(gguf_file)
    model, tokenizer = load_gguf(path)
    return save_model_dir(model, tokenizer, out_dir, dtype, extra={"import.json": import_record(path, dtype)})
