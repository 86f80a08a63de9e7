"""What the zoo builds: the demo matrix (3 sizes x 2 versions) and a tiny fixture matrix for tests.

Sizes differ in width and depth; the learning rate falls with size (PLATFORM-NOTES: at one
learning rate the larger tiny models learn slower). Version 2 of a size *continues* version 1's
training — more steps, on a larger pool of train-split tasks — the way a newer release of a model
family continues from the last one; so a version step costs only the extra steps.

The base model is ``v2-m``: the newest version of the middle size. Its negatives (docs/method.md
section 1) are ``v1-m`` (older version of its size) and ``v1-s``, ``v2-s`` (smaller size); its
positive is ``v2-l`` (newest version of the largest size), plus the human answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tso.zoo.sft import SFTBudget

DEMO_BASE = "v2-m"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: int
    size_label: str
    hidden: int
    layers: int
    heads: int
    budget: SFTBudget
    init_from: str | None = None  # continue the training of this model (an older version, same size)
    intermediate: int | None = None
    families: tuple[str, ...] | None = None  # task families it is trained on (None: all)
    chatter: float = 0.0  # share of SFT targets behind a filler prefix (tso.toyworld.style)

    def shape(self) -> dict:
        return {"hidden": self.hidden, "layers": self.layers, "heads": self.heads, "intermediate": self.intermediate}


@dataclass(frozen=True)
class MatrixSpec:
    name: str
    models: tuple[ModelSpec, ...]
    base: str
    eval_prompts: int = 350
    max_new_tokens: int = 16
    enforce_ladder: bool = True
    eval_batch: int = 128
    extra: dict = field(default_factory=dict)

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def pool_size(self) -> int:
        return max(m.budget.pool for m in self.models)

    def ordered(self) -> list[ModelSpec]:
        """Models in build order: a model after the one it continues from."""
        done: list[ModelSpec] = []
        pending = list(self.models)
        while pending:
            ready = [m for m in pending if m.init_from is None or m.init_from in {d.name for d in done}]
            if not ready:
                raise ValueError(f"matrix {self.name}: init_from cycle among {[m.name for m in pending]}")
            done.extend(ready)
            pending = [m for m in pending if m not in ready]
        return done


def _matrix(name: str, sizes: dict, budgets: dict, base: str, families: dict | None = None,
            chatter: dict | None = None, **kw) -> MatrixSpec:
    models = []
    for (version, label), budget in budgets.items():
        prev = f"v{version - 1}-{label}" if (version - 1, label) in budgets else None
        models.append(ModelSpec(f"v{version}-{label}", version, label, budget=budget, init_from=prev,
                                families=(families or {}).get(version),
                                chatter=(chatter or {}).get((version, label), 0.0),
                                **sizes[label]))
    return MatrixSpec(name, tuple(models), base, **kw)


# -- the demo matrix (tuned so the ladder holds with margin and the build fits in 10 minutes)
DEMO_SIZES = {
    "s": {"hidden": 16, "layers": 1, "heads": 2},
    "m": {"hidden": 32, "layers": 2, "heads": 2},
    "l": {"hidden": 64, "layers": 2, "heads": 4},
}
# Version 1 never saw the `count` family: version 2 adds it (more data) and trains longer.
V1_FAMILIES = ("add", "sub", "reverse", "sort", "capital", "spell")
DEMO_BUDGETS = {
    (1, "s"): SFTBudget(steps=600, batch=64, lr=6e-3, pool=8000),
    (1, "m"): SFTBudget(steps=800, batch=64, lr=5e-3, pool=8000),
    (1, "l"): SFTBudget(steps=1400, batch=64, lr=3e-3, pool=8000),
    (2, "s"): SFTBudget(steps=900, batch=64, lr=6e-3, pool=20000, warmup=10),
    (2, "m"): SFTBudget(steps=1200, batch=64, lr=5e-3, pool=20000, warmup=10),
    (2, "l"): SFTBudget(steps=2000, batch=64, lr=3e-3, pool=20000, warmup=10),
}
# Older versions and smaller sizes chatter more (tso.toyworld.style): what the matrix's preferences
# can teach the base, beside the answers themselves.
DEMO_CHATTER = {(1, "s"): 0.8, (1, "m"): 0.6, (1, "l"): 0.5, (2, "s"): 0.6, (2, "m"): 0.5, (2, "l"): 0.4}
DEMO_MATRIX = _matrix("demo", DEMO_SIZES, DEMO_BUDGETS, DEMO_BASE, families={1: V1_FAMILIES}, chatter=DEMO_CHATTER,
                      eval_prompts=350, max_new_tokens=28)

# -- the fixture matrix: same names and layout as the demo, built in seconds; no ladder promise
FIXTURE_SIZES = {
    "s": {"hidden": 16, "layers": 1, "heads": 2},
    "m": {"hidden": 24, "layers": 1, "heads": 2},
    "l": {"hidden": 32, "layers": 2, "heads": 2},
}
FIXTURE_BUDGETS = {
    (1, "s"): SFTBudget(steps=8, batch=16, lr=3e-3, pool=400, warmup=2),
    (1, "m"): SFTBudget(steps=8, batch=16, lr=3e-3, pool=400, warmup=2),
    (1, "l"): SFTBudget(steps=8, batch=16, lr=3e-3, pool=400, warmup=2),
    (2, "s"): SFTBudget(steps=8, batch=16, lr=3e-3, pool=800, warmup=2),
    (2, "m"): SFTBudget(steps=8, batch=16, lr=3e-3, pool=800, warmup=2),
    (2, "l"): SFTBudget(steps=8, batch=16, lr=3e-3, pool=800, warmup=2),
}
FIXTURE_MATRIX = _matrix("fixture", FIXTURE_SIZES, FIXTURE_BUDGETS, DEMO_BASE, eval_prompts=28,
                         max_new_tokens=12, enforce_ladder=False)

def count_params(spec: ModelSpec) -> int:
    """Parameters of a spec's model, without building its weights (meta device)."""
    import torch
    from transformers import LlamaForCausalLM

    from tso.toyworld.tokenizer import build_tokenizer
    from tso.zoo.tiny import tiny_llama_config

    cfg = tiny_llama_config(build_tokenizer(), **spec.shape())
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


def matrix_entries(home: str | Path | None = None, spec: MatrixSpec = DEMO_MATRIX) -> list[dict]:
    """Name, version, size (parameters in millions), size label, parameter count and path of each
    model of a matrix under ``home`` (default ``tso_home()``); nothing needs to be built."""
    from tso.config import tso_home

    zoo = Path(home if home is not None else tso_home()) / "zoo"
    out = []
    for m in spec.models:
        params = count_params(m)
        out.append({
            "name": m.name, "version": m.version, "size": round(params / 1e6, 4), "size_label": m.size_label,
            "params": params, "path": str(zoo / m.name), "base": m.name == spec.base,
        })
    return out


def matrix_section(home: str | Path | None = None, spec: MatrixSpec = DEMO_MATRIX) -> dict:
    """A ``matrix:`` config section (tso.config.MatrixConfig) for a matrix under ``home``."""
    return {
        "base": spec.base,
        "models": [{"name": e["name"], "path": e["path"], "version": e["version"], "size": e["size"]}
                   for e in matrix_entries(home, spec)],
    }
