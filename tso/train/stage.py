"""One stage of policy training as one worker runs it, with or without Ray.

``run_policy_worker`` loads the base model and the pairs, builds the backend, resumes from a boundary
checkpoint when given one, runs the mini-batch loop and, on rank 0, writes the new policy version
(an HF model directory with ``lineage.json``), the plot and a summary. The Ray Train wrapper
(``ray_trainer.py``) and the in-process runner (``train_policy_local``) both call it; only the
``report`` callback and where the resume checkpoint comes from differ.

Output layout of ``out_dir``:
    policy/            the trained policy (save_pretrained + tokenizer + lineage.json)
    metrics.jsonl      per-step / reference / boundary / summary records (tso.train.metrics)
    training.png       rewards, margin, gradient scale over steps with mini-batch boundaries
    rejects.json       pairs left out (too long for train.max_length, malformed), with ids
    summary.json       what was trained, how fast, where everything is
    checkpoints/       boundary checkpoints, the newest train.keep_checkpoints (the in-process runner;
                       Ray keeps them under ray/)
    .tmp/              each worker's boundary checkpoint until it is reported (empty between boundaries)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tso.config import TrainConfig
from tso.io import atomic_write_text, replace_dir
from tso.models.chat import stop_token_ids
from tso.train import dist
from tso.train.backend import make_backend
from tso.train.checkpoint import load_boundary, scratch_dir
from tso.train.data import read_pairs, tokenize_pairs
from tso.train.export import lineage_record, save_hf_model
from tso.train.metrics import MetricsLog
from tso.train.minibatch import checkpoint_meta, make_frozen_copy, plan_stage, run_minibatch_dpo

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
POLICY_DIR = "policy"


@dataclass
class PolicyJob:
    """Everything a worker needs (picklable: it travels to Ray Train workers as train_loop_config)."""

    train: dict[str, Any]  # TrainConfig.model_dump()
    pairs_path: str
    base_path: str
    out_dir: str
    stage: int = 1
    base_name: str | None = None
    config_hash: str | None = None
    backend: str = "deepspeed"
    threads: int | None = None
    fault: dict[str, Any] | None = None  # tests only: kill a worker at a step (ray_trainer)
    options: dict[str, Any] = field(default_factory=dict)  # the base's loading options (tso.models.checkpoint)

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)


@dataclass
class TrainResult:
    out_dir: str
    policy_dir: str
    metrics_path: str
    plot_path: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[str] = field(default_factory=list)


def device_for(train: TrainConfig) -> torch.device:
    if train.use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu is set but no CUDA device is visible")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():  # one visible device per worker
            local = 0
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def training_dtype(train: TrainConfig, backend: str = "deepspeed") -> torch.dtype:
    """The dtype weights are loaded in. On GPU under DeepSpeed: bf16 (the engine trains bf16 weights and
    keeps the fp32 master copy in its optimizer, so an fp32 load would only cost a full fp32 copy per
    worker first). The plain backend keeps fp32 weights and autocasts; on CPU everything is fp32."""
    return torch.bfloat16 if train.use_gpu and backend == "deepspeed" else torch.float32


def check_model_settings(train: TrainConfig, backend: str = "deepspeed") -> None:
    """What the model-loading settings need, checked before any weight is read (a preflight)."""
    import importlib.util

    if train.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("train.attn_implementation = flash_attention_2 needs the flash-attn package "
                         "(pip install flash-attn), which is not installed here; use sdpa")
    if train.lora is not None and importlib.util.find_spec("peft") is None:
        raise ValueError("train.lora needs the peft package (pip install peft)")


class Zero3Construction:
    """Partitioned construction for ZeRO-3: while transformers' ``HfDeepSpeedConfig`` is alive,
    ``from_pretrained`` builds the model under ``deepspeed.zero.Init`` and loads each weight straight
    into this worker's partition, so no worker ever holds the whole model. transformers keeps only a
    weak reference: the object is kept on the model (``_tso_zero3``) for as long as the model lives."""

    def __init__(self, train: TrainConfig, use_gpu: bool):
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        from tso.train.backend import ensure_process_group
        from tso.train.deepspeed_config import deepspeed_config

        ensure_process_group(use_gpu)  # zero.Init partitions over the process group ...
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # ... through DeepSpeed's comm
        self.config = deepspeed_config(train, world_size=dist.world_size(), use_gpu=use_gpu)
        self.hf = HfDeepSpeedConfig(self.config)


def load_model_and_tokenizer(path: str, train: TrainConfig, options: dict[str, Any] | None = None,
                             backend: str = "deepspeed"):
    """The model in its training dtype (``training_dtype``), with the configured attention kernel,
    gradient checkpointing and LoRA adapters, and its tokenizer with the configured chat template, the
    one the policy's answers were sampled with. Under DeepSpeed ZeRO-3 the weights are loaded
    partitioned (``Zero3Construction``)."""
    from tso.models.checkpoint import load_causal_lm, load_tokenizer, require_checkpoint

    check_model_settings(train, backend)
    require_checkpoint(path)
    tokenizer = load_tokenizer(path, options)
    device = device_for(train)
    zero3 = Zero3Construction(train, train.use_gpu) if backend == "deepspeed" and train.zero_stage == 3 else None
    model = load_causal_lm(path, options, dtype=training_dtype(train, backend),
                           attn_implementation=train.attn_implementation)
    if zero3 is None:
        model.to(device)
    else:
        model._tso_zero3 = zero3
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if train.lora is not None:
        from tso.train.lora import apply_lora

        model = apply_lora(model, train.lora, train.seed)
    if train.compile:
        compile_decoder(model)
    return model, tokenizer


def compile_decoder(model) -> None:
    """torch.compile the decoder stack in place (dynamic shapes: pair lengths vary); the LM head stays
    eager because the chunked log-probs already bound its memory and it runs on response positions only."""
    model.get_decoder().compile(dynamic=True)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant, so frozen inputs such as LoRA's
    need no ``enable_input_require_grads``), KV cache off. transformers checkpoints only in training
    mode with gradients on, so the boundary reference pass (eval, no_grad) runs without it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def start_worker(job) -> tuple[TrainConfig, int, Any, Any]:
    """What a training worker (policy or judge) does first: its threads, its config, its rank, and
    the base model with the tokenizer its answers were made with."""
    if job.threads:
        torch.set_num_threads(job.threads)
    train = job.train_config
    model, tokenizer = load_model_and_tokenizer(job.base_path, train, job.options, getattr(job, "backend", "deepspeed"))
    return train, dist.rank(), model, tokenizer


def run_policy_worker(job: PolicyJob, report=None, resume_dir: str | Path | None = None,
                      log: Callable[[str], None] | None = print, checkpoints: bool = True) -> dict[str, Any] | None:
    train, rank, model, tokenizer = start_worker(job)
    out = Path(job.out_dir)
    stops = stop_token_ids(tokenizer, model.generation_config, job.options.get("stop_tokens"))
    pairs, rep = tokenize_pairs(read_pairs(job.pairs_path), tokenizer, train.max_length, stops)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "rejects.json", json.dumps(rep.to_dict(), indent=2))
        if log:
            log(f"[stage {job.stage}] {job.pairs_path}: {rep.summary()}")
    if not pairs:
        raise ValueError(f"{job.pairs_path}: no trainable pairs ({rep.summary()})")
    plan = plan_stage(len(pairs), train, job.stage)
    if train.reference == "frozen_copy" and train.zero_stage == 3 and job.backend == "deepspeed":
        raise ValueError("train.reference = frozen_copy is not supported with ZeRO stage 3 (the copy would need "
                         "the gathered weights at every boundary); use reference: policy or zero_stage <= 2")
    ref_module = make_frozen_copy(model) if train.reference == "frozen_copy" else None
    backend = make_backend(job.backend, model, train, plan.total_steps)
    resume = None
    if resume_dir is not None:
        resume = load_boundary(backend, resume_dir, checkpoint_meta(pairs, train, job.stage))
    metrics = MetricsLog(out / METRICS_FILE, enabled=rank == 0)
    res = run_minibatch_dpo(backend, pairs, train, pad_id=tokenizer.pad_token_id, stage=job.stage, plan=plan,
                            report=report, resume=resume, ref_module=ref_module, metrics=metrics,
                            tokenizer=tokenizer, checkpoints=checkpoints, log=log,
                            scratch_dir=scratch_dir(out, rank) if checkpoints else None)
    weights = backend.full_state_dict()
    if rank != 0:
        dist.barrier()
        return None
    lineage = lineage_record(
        base=job.base_path, stage=job.stage, kind="policy", data=job.pairs_path, config_hash=job.config_hash,
        base_name=job.base_name, loss=train.loss.type, minibatches=train.minibatches, epochs=train.epochs,
        reference=train.reference, steps=res.steps, pairs=len(pairs), seed=train.seed,
        world_size=dist.world_size(), backend=job.backend,
        lora=train.lora.model_dump(mode="json") if train.lora else None,
    )
    policy_dir = save_hf_model(backend.module, out / POLICY_DIR, tokenizer, state_dict=weights, lineage=lineage,
                               lora_export=train.lora.export if train.lora else "merged")
    plot_path = None
    try:
        from tso.train.plots import plot_training

        plot_path = str(plot_training(out / METRICS_FILE, out / PLOT_FILE, title=f"stage {job.stage}"))
    except Exception as e:  # a plot must never cost the trained model
        if log:
            log(f"[stage {job.stage}] plot failed: {e!r}")
    summary = {"kind": "summary", "stage": job.stage, "policy_dir": str(policy_dir), "plot": plot_path,
               "metrics": str(out / METRICS_FILE), "pairs": len(pairs), "tokenize": rep.to_dict(),
               "minibatch_sizes": [len(m) for m in plan.minibatches], "steps_per_epoch": plan.steps_per_epoch,
               **res.to_dict()}
    metrics.write({k: v for k, v in summary.items() if k not in ("tokenize", "boundaries", "last_step")})
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    dist.barrier()
    return summary


# ----------------------------------------------------------------------------- in-process runner


def boundary_number(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


class LocalCheckpoints:
    """The in-process ``report``: keeps the newest ``keep`` boundary checkpoints of a stage under
    ``out_dir/checkpoints`` (as Ray Train's ``num_to_keep`` does), deleting an older one only once the
    new one is complete. Copies a killed attempt left half-done are removed when it starts."""

    def __init__(self, root: Path, log=None, keep: int = 1):
        self.root, self.log, self.keep, self.saved = root, log, keep, []
        for old in [*root.glob(".*.tmp-*"), *root.glob(".*.old-*")]:
            shutil.rmtree(old, ignore_errors=True)

    def __call__(self, metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        if ckpt_dir is None:
            return
        final = self.root / f"stage{metrics['stage']}_boundary_{metrics['boundary']:02d}"
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ckpt_dir, tmp)
        replace_dir(tmp, final)
        self.saved.append(str(final))
        self.prune(metrics["stage"], metrics["boundary"])

    def boundaries(self, stage: int) -> list[Path]:
        """The stage's complete checkpoints, oldest first (by boundary number, not by name)."""
        return sorted(self.root.glob(f"stage{stage}_boundary_*"), key=boundary_number)

    def prune(self, stage: int, newest: int) -> None:
        """Keep ``newest`` and the ``keep - 1`` boundaries before it; each older one is moved aside
        first, so a kill while deleting never leaves a half-deleted checkpoint under a good name."""
        older = [b for b in self.boundaries(stage) if boundary_number(b) < newest]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            aside = old.with_name(f".{old.name}.old-{os.getpid()}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(old, aside)
            shutil.rmtree(aside, ignore_errors=True)
            if str(old) in self.saved:
                self.saved.remove(str(old))

    def latest(self, stage: int) -> Path | None:
        found = self.boundaries(stage)
        return found[-1] if found else None


def train_policy_local(job: PolicyJob, resume: bool = True, log: Callable[[str], None] | None = print,
                       checkpoints: bool = True) -> TrainResult:
    """Run a stage in this process (one worker; DeepSpeed or plain torch), resuming from the latest
    boundary checkpoint in ``out_dir/checkpoints`` when there is one."""
    out = Path(job.out_dir)
    store = LocalCheckpoints(out / "checkpoints", log, keep=job.train_config.keep_checkpoints)
    latest = store.latest(job.stage) if resume else None
    summary = run_policy_worker(job, report=store, resume_dir=latest, log=log, checkpoints=checkpoints)
    return TrainResult(str(out), summary["policy_dir"], summary["metrics"], summary["plot"], summary, store.saved)


def result_from_dir(out_dir: str | Path, checkpoints: list[str] | None = None) -> TrainResult:
    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    return TrainResult(str(out), summary["policy_dir"], summary["metrics"], summary["plot"], summary, checkpoints or [])


def as_dict(result: TrainResult) -> dict[str, Any]:
    return asdict(result)
