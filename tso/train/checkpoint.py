"""Boundary checkpoints: everything needed to resume at the next mini-batch without redoing finished ones.

A checkpoint directory holds
- ``engine/``: the optimizer, LR schedule and model state (a DeepSpeed checkpoint: model states from
  rank 0, one optimizer partition per rank; or one torch file for the plain backend);
- ``policy/``: the policy at this boundary as a Hugging Face model directory (rank 0), so a separate
  process can load it with ``from_pretrained``;
- ``rng/rank<r>.pt``: each rank's RNG states, as tensors and plain numbers (it loads with
  ``torch.load(weights_only=True)``: resuming never unpickles code);
- ``reference_next.json``: the reference log-probs of the next mini-batch, computed by this policy;
- ``tso_state.json``: boundary index, optimizer step, stage, and what the run was (pairs digest, K,
  world size, config hash), so a resume with different inputs is refused instead of mixed.
Every rank writes its own files into its own directory (under the output directory's ``.tmp/``,
never the system temp dir); Ray Train merges them into one.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tso.io import atomic_write_text
from tso.train import dist
from tso.train.backend import TrainBackend
from tso.train.export import save_hf_model
from tso.train.reference import RefLogps

CHECKPOINT_STATE_DIR = "engine"  # the backend's own checkpoint (DeepSpeed engine or torch state)

STATE_FILE = "tso_state.json"
REFERENCE_FILE = "reference_next.json"
SCRATCH_DIR = ".tmp"  # each worker's boundary checkpoint before it is reported, inside the output directory


@dataclass
class ResumeState:
    boundary: int  # mini-batches finished
    step: int  # optimizer steps taken
    stage: int
    reference: RefLogps | None  # for mini-batch boundary + 1 (None in frozen-copy mode or at the end)
    meta: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, ints, floats and strings only, so that the file loads
    with ``torch.load(weights_only=True)`` (numpy's state is a tuple holding an ndarray, python's a tuple)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path)
    return path


def load_rng(path: str | Path) -> None:
    """Restore the RNG states of ``save_rng``; a file an older tso pickled (numpy arrays, tuples) is
    refused rather than unpickled."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors have no common base
        raise ValueError(f"{path}: RNG state does not load with weights_only=True (written by an older tso?); "
                         f"resume from an earlier stage or delete the checkpoints to start the stage again: {e}") from None
    set_rng_state(state)


def scratch_dir(out_dir: str | Path, rank: int) -> Path:
    """Where this worker writes its boundary checkpoints before reporting them: ``<out_dir>/.tmp``,
    emptied of this rank's leftovers, which only a killed earlier attempt leaves behind."""
    root = Path(out_dir) / SCRATCH_DIR
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"tso-*-rank{rank}-*"):
        shutil.rmtree(old, ignore_errors=True)
    return root


def save_boundary(backend: TrainBackend, path: str | Path, *, boundary: int, step: int, stage: int,
                  next_reference: RefLogps | None, meta: dict[str, Any], tokenizer=None) -> Path:
    """Collective: every rank calls it with its own ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend.save(path / CHECKPOINT_STATE_DIR)
    save_rng(path / "rng" / f"rank{dist.rank()}.pt")
    weights = backend.full_state_dict()  # a collective under ZeRO-3
    if dist.rank() == 0:
        save_hf_model(backend.module, path / "policy", tokenizer, state_dict=weights)
        if next_reference is not None:
            ids = sorted(next_reference)
            atomic_write_text(path / REFERENCE_FILE, json.dumps({
                "minibatch": boundary + 1, "ids": ids,
                "chosen": [next_reference[i][0] for i in ids], "rejected": [next_reference[i][1] for i in ids],
            }))
        atomic_write_text(path / STATE_FILE, json.dumps(
            {"boundary": boundary, "step": step, "stage": stage, "world_size": dist.world_size(), **meta},
            indent=2, sort_keys=True))
    dist.barrier()
    return path


def read_reference(path: str | Path) -> tuple[int, RefLogps] | None:
    f = Path(path) / REFERENCE_FILE
    if not f.is_file():
        return None
    d = json.loads(f.read_text())
    return d["minibatch"], {i: (c, r) for i, c, r in zip(d["ids"], d["chosen"], d["rejected"])}


def read_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a tso boundary checkpoint (no {STATE_FILE})")
    return json.loads(f.read_text())


def load_boundary(backend: TrainBackend, path: str | Path, expect: dict[str, Any]) -> ResumeState:
    """Restore backend and RNG state from a boundary checkpoint, after checking it belongs to this run."""
    path = Path(path)
    state = read_state(path)
    expect = {**expect, "world_size": dist.world_size()}
    wrong = {k: (state.get(k), v) for k, v in expect.items() if state.get(k) != v}
    if wrong:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in wrong.items())
        raise ValueError(f"{path}: checkpoint is from a different run ({details}); use a new output directory")
    backend.load(path / CHECKPOINT_STATE_DIR)
    rng_file = path / "rng" / f"rank{dist.rank()}.pt"
    if rng_file.is_file():
        load_rng(rng_file)
    ref = read_reference(path)
    reference = ref[1] if ref and ref[0] == state["boundary"] + 1 else None
    return ResumeState(boundary=state["boundary"], step=state["step"], stage=state["stage"], reference=reference,
                       meta=state)
