"""One small interface over the two ways a training step is executed: a DeepSpeed engine (what Ray Train workers
run) and plain PyTorch in one process (a fallback, and a point of comparison in benchmarks).

The loop calls ``backward(loss)`` once per micro-batch and ``step()`` after each; the optimizer steps
only at the gradient-accumulation boundary, as DeepSpeed does. Losses are per-micro-batch means: both
engines divide by the accumulation count, and DeepSpeed averages gradients over data-parallel ranks.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from tso.config import TrainConfig
from tso.train import dist
from tso.train.deepspeed_config import build_optimizer, build_scheduler, deepspeed_config, grad_accum_steps

DS_TAG = "state"


class TrainBackend:
    module: torch.nn.Module
    grad_accum: int
    kind: str
    autocast_dtype: torch.dtype | None = None  # mixed precision by autocast (plain backend on GPU)

    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def grad_norm(self) -> float | None: ...
    def lr(self) -> float: ...
    def save(self, path: Path) -> None: ...
    def load(self, path: Path) -> None: ...
    def full_state_dict(self) -> dict[str, torch.Tensor] | None: ...

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


class TorchBackend(TrainBackend):
    """Plain PyTorch: AdamW, LambdaLR, clip_grad_norm_; one process (no data parallelism)."""

    kind = "torch"

    def __init__(self, model: torch.nn.Module, train: TrainConfig, total_steps: int):
        if dist.world_size() > 1:
            raise ValueError("TorchBackend runs in one process; use the DeepSpeed backend for several workers")
        self.module = model
        self.grad_accum = grad_accum_steps(train, 1)
        self.clip = train.optimizer.grad_clip
        self.optimizer = build_optimizer(model, train.optimizer)
        self.scheduler = build_scheduler(self.optimizer, train.optimizer, total_steps)
        self._micro = 0
        self._norm: float | None = None
        # on GPU: fp32 weights and Adam states, bf16 compute (DeepSpeed's engine keeps bf16 weights instead)
        self.autocast_dtype = torch.bfloat16 if next(model.parameters()).is_cuda else None

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.grad_accum:
            return
        self._norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float | None:
        return self._norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "micro": self._micro}, path / "torch_engine.pt")

    def load(self, path: Path) -> None:
        state = torch.load(path / "torch_engine.pt", map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


class DeepSpeedBackend(TrainBackend):
    """``deepspeed.initialize`` with torch AdamW and the warm-up/cosine LambdaLR; ZeRO stage from config."""

    kind = "deepspeed"

    def __init__(self, model: torch.nn.Module, train: TrainConfig, total_steps: int, use_gpu: bool | None = None):
        import deepspeed

        ensure_process_group(use_gpu if use_gpu is not None else train.use_gpu)
        warn_stale_op_locks()
        zero3 = getattr(model, "_tso_zero3", None)  # the config the model was built partitioned under
        self.config = zero3.config if zero3 is not None else deepspeed_config(train, world_size=dist.world_size(),
                                                                              use_gpu=use_gpu)
        if train.zero_stage == 3 and zero3 is None and dist.rank() == 0:
            print("warning: ZeRO-3 engine over a model that was loaded whole (not under zero.Init); "
                  "tso.train.stage.load_model_and_tokenizer loads it partitioned", flush=True)
        optimizer = build_optimizer(model, train.optimizer)
        self.ds_engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: build_scheduler(opt, train.optimizer, total_steps),
            config=self.config,
        )
        self.module = self.ds_engine.module
        self.grad_accum = self.ds_engine.gradient_accumulation_steps()
        self.zero_stage = train.zero_stage

    def backward(self, loss: torch.Tensor) -> None:
        self.ds_engine.backward(loss)

    def step(self) -> None:
        self.ds_engine.step()

    def grad_norm(self) -> float | None:
        norm = self.ds_engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return float(self.ds_engine.get_lr()[0])

    def save(self, path: Path) -> None:
        """Every rank writes its own files (model states on rank 0, an optimizer partition per rank)."""
        self.ds_engine.save_checkpoint(str(path), tag=DS_TAG)

    def load(self, path: Path) -> None:
        load_path, _ = self.ds_engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (tag {DS_TAG!r})")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (gathered under ZeRO-3; a collective, call on every rank)."""
        if self.zero_stage == 3:
            state = self.ds_engine._zero3_consolidated_16bit_state_dict()
            return state if dist.rank() == 0 else None
        return self.module.state_dict() if dist.rank() == 0 else None

    def train(self) -> None:
        self.ds_engine.train()

    def eval(self) -> None:
        self.ds_engine.eval()


def warn_stale_op_locks(max_age_s: float = 600.0) -> list[str]:
    """DeepSpeed JIT-builds its ops with torch's cpp_extension, which waits forever on the build directory's
    ``lock`` file. A build killed half-way leaves that file behind and every later ``deepspeed.initialize``
    hangs; say so (a build takes 1-2 minutes, so an old lock is a stale one). Returns the stale locks."""
    import glob
    import sys
    import time

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    stale = [p for p in glob.glob(os.path.join(root, "*", "*", "lock")) if time.time() - os.path.getmtime(p) > max_age_s]
    for p in stale:
        print(f"warning: {p} is {int(time.time() - os.path.getmtime(p))} s old: a DeepSpeed op build was probably killed; "
              "loading the op will wait on it forever. Delete it if no build is running.", file=sys.stderr, flush=True)
    return stale


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(use_gpu: bool) -> None:
    """DeepSpeed needs a process group; in one plain process make a world of one (gloo on CPU)."""
    if dist.active():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("nccl" if use_gpu else "gloo", rank=int(os.environ["RANK"]),
                                         world_size=int(os.environ["WORLD_SIZE"]))


def make_backend(kind: str, model: torch.nn.Module, train: TrainConfig, total_steps: int,
                use_gpu: bool | None = None) -> TrainBackend:
    if kind == "deepspeed":
        return DeepSpeedBackend(model, train, total_steps, use_gpu)
    if kind == "torch":
        return TorchBackend(model, train, total_steps)
    raise ValueError(f"unknown backend {kind!r} (have 'deepspeed', 'torch')")
