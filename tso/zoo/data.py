"""The embedded default's data files under ``$TSO_HOME/data``: prompt splits and judge feedback.

- ``prompts_train.jsonl``, ``prompts_pref.jsonl``, ``prompts_eval.jsonl``: {id, prompt, human, family}
  (``pref`` feeds the pairs pipeline; ``eval`` is held out).
- ``feedback_train.jsonl`` (tasks of the train split) and ``feedback_eval.jsonl`` (held-out eval
  tasks): scored judge examples (tso.toyworld.feedback), with answers of the built matrix's models
  among them when a matrix is built.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from tso.toyworld.feedback import feedback_records, write_feedback_jsonl
from tso.toyworld.tasks import generate_tasks, write_prompts_jsonl

PROMPT_FILES = {s: f"prompts_{s}.jsonl" for s in ("train", "pref", "eval")}
FEEDBACK_FILES = {"train": "feedback_train.jsonl", "eval": "feedback_eval.jsonl"}


def data_dir(home: str | Path | None = None) -> Path:
    from tso.config import tso_home

    return Path(home if home is not None else tso_home()) / "data"


def write_prompts(out: str | Path, seed: int = 0, n_train: int = 7000, n_pref: int = 1400,
                  n_eval: int = 700) -> list[Path]:
    out = Path(out)
    paths = []
    for split, n in (("train", n_train), ("pref", n_pref), ("eval", n_eval)):
        paths.append(write_prompts_jsonl(out / PROMPT_FILES[split], generate_tasks(split, n, seed)))
    return paths


def model_answers(home: str | Path, tasks: list[dict], seed: int = 0, temperature: float = 1.0,
                  max_new_tokens: int = 16, models_per_task: int = 1) -> dict[str, list[tuple[str, str]]]:
    """Answers of the built matrix's models to ``tasks`` (sampled, so styles and mistakes vary).

    Each task is answered by ``models_per_task`` models, assigned round-robin after a seeded
    shuffle, so every model contributes and the cost stays at ``models_per_task`` generations a task.
    """
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tso.zoo.build import zoo_dir
    from tso.zoo.generate import generate_answers
    from tso.zoo.manifest import read_manifest

    manifest = read_manifest(zoo_dir(home)) or {"models": {}}
    names = [n for n, e in sorted(manifest["models"].items()) if (Path(e["path"]) / "config.json").is_file()]
    out: dict[str, list[tuple[str, str]]] = {t["id"]: [] for t in tasks}
    if not names:
        return out
    hf_logging.disable_progress_bar()
    order = list(range(len(tasks)))
    random.Random(f"{seed}|model-answers").shuffle(order)
    assigned: dict[str, list[dict]] = {n: [] for n in names}
    for rank, i in enumerate(order):
        for k in range(min(models_per_task, len(names))):
            assigned[names[(rank + k) % len(names)]].append(tasks[i])
    for name in names:
        if not assigned[name]:
            continue
        path = Path(manifest["models"][name]["path"])
        model = AutoModelForCausalLM.from_pretrained(str(path))
        tok = AutoTokenizer.from_pretrained(str(path))
        answers = generate_answers(model, tok, [t["prompt"] for t in assigned[name]], max_new_tokens=max_new_tokens,
                                   temperature=temperature, seed=seed)
        for t, a in zip(assigned[name], answers):
            out[t["id"]].append((name, a))
    return out


def write_feedback(home: str | Path | None = None, out: str | Path | None = None, seed: int = 0,
                   n_train: int = 1500, n_eval: int = 300, answers_per_task: int = 2, ai_fraction: float = 0.5,
                   ai_noise: float = 1.0, use_models: bool = True) -> list[Path]:
    out = Path(out) if out is not None else data_dir(home)
    paths: list[Path] = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        tasks = generate_tasks(split, n, seed + 1)
        answers = model_answers(home, tasks, seed=seed) if use_models and home is not None else None
        records = feedback_records(tasks, seed=seed, answers_per_task=answers_per_task, ai_fraction=ai_fraction,
                                   ai_noise=ai_noise, model_answers=answers)
        paths.append(write_feedback_jsonl(out / FEEDBACK_FILES[split], records))
    return paths


DATA_SIZES = {
    "demo": {"prompts": {"n_train": 7000, "n_pref": 1400, "n_eval": 700}, "feedback": {"n_train": 1500, "n_eval": 300}},
    "fixture": {"prompts": {"n_train": 1000, "n_pref": 200, "n_eval": 350}, "feedback": {"n_train": 100, "n_eval": 50}},
}


def write_data(home: str | Path | None = None, seed: int = 0, use_models: bool = True, sizes: str = "demo") -> list[Path]:
    """All data files (prompts first, then feedback), at the sizes of ``DATA_SIZES[sizes]``."""
    from tso.config import tso_home

    home = Path(home) if home is not None else tso_home()
    n = DATA_SIZES[sizes]
    with one_thread():
        return (write_prompts(data_dir(home), seed=seed, **n["prompts"])
                + write_feedback(home, seed=seed, use_models=use_models, **n["feedback"]))


@contextmanager
def one_thread():
    """Tiny models generate fastest on one torch thread; two threads on a busy 2-core machine
    were measured 20-40x slower (OpenMP threads waiting on each other)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
