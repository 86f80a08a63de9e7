"""The judge's evaluation correction as one job (docs/method.md section 2): pi_eval = SFT(pi_base, D_feedback).

A worker loads the base and the feedback (``feedback``), fine-tunes on the answer tokens (``sft``)
with the machinery of policy training (a DeepSpeed or plain-torch backend, sharding, a checkpoint
per epoch), and rank 0 writes the judge as an HF model directory with ``lineage.json``, its metrics
and loss plot. No ray here: ``ray_trainer.train_judge`` runs ``run_judge_worker`` on Ray Train workers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tso.config import RunConfig, TrainConfig
from tso.io import atomic_write_text
from tso.train import dist
from tso.train.backend import make_backend
from tso.train.checkpoint import load_boundary, scratch_dir
from tso.train.export import lineage_record, save_hf_model
from tso.train.feedback import read_feedback
from tso.train.metrics import MetricsLog
from tso.train.sft import run_sft, sft_total_steps
from tso.train.stage import start_worker

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "judge_loss.png"


def judge_train_config(cfg: RunConfig) -> TrainConfig:
    """The judge's schedule (judge.train) on the policy's machinery settings (workers, ZeRO, optimizer)."""
    t, j = cfg.train, cfg.judge.train
    data = t.model_dump()
    data.update(global_batch=j.global_batch, micro_batch=j.micro_batch, epochs=j.epochs, minibatches=1,
                reference="policy", max_length=j.max_length)
    data["optimizer"].update(lr=j.lr, warmup_ratio=j.warmup_ratio)
    # train.deepspeed may repeat the policy's batch sizes; the judge has its own
    data["deepspeed"] = {k: v for k, v in data.get("deepspeed", {}).items() if k not in JUDGE_OWN_DEEPSPEED_KEYS}
    return TrainConfig.model_validate(data)


JUDGE_OWN_DEEPSPEED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass
class JudgeJob:
    train: dict[str, Any]  # judge_train_config(cfg).model_dump()
    feedback_path: str
    base_path: str
    out_dir: str  # the judge model directory
    work_dir: str  # metrics, plot, summary, checkpoints
    config_hash: str | None = None
    base_name: str | None = None
    max_examples: int | None = None
    backend: str = "deepspeed"
    threads: int | None = None
    fault: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the base's loading options

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)


def run_judge_worker(job: JudgeJob, report=None, resume_dir: str | Path | None = None,
                     log: Callable[[str], None] | None = print, checkpoints: bool = True) -> dict[str, Any] | None:
    train, rank, model, tokenizer = start_worker(job)
    work = Path(job.work_dir)
    examples, rep = read_feedback(job.feedback_path, tokenizer, train.max_length, job.max_examples)
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / "rejects.json", json.dumps(rep.to_dict(), indent=2))
        if log:
            log(f"[judge] {job.feedback_path}: {rep.summary()}")
    backend = make_backend(job.backend, model, train, sft_total_steps(len(examples), train))
    resume = None
    if resume_dir is not None:
        resume = load_boundary(backend, resume_dir, {"examples": len(examples), "kind": "judge_sft", "stage": 0})
    metrics = MetricsLog(work / METRICS_FILE, enabled=rank == 0)
    res = run_sft(backend, examples, train, pad_id=tokenizer.pad_token_id, report=report, resume=resume,
                  metrics=metrics, tokenizer=tokenizer, checkpoints=checkpoints, log=log,
                  scratch_dir=scratch_dir(work, rank) if checkpoints else None)
    weights = backend.full_state_dict()
    if rank != 0:
        dist.barrier()
        return None
    lineage = lineage_record(base=job.base_path, stage=0, kind="judge", data=job.feedback_path,
                             config_hash=job.config_hash, base_name=job.base_name, steps=res["steps"],
                             examples=len(examples), epochs=train.epochs, seed=train.seed)
    judge_dir = save_hf_model(backend.module, job.out_dir, tokenizer, state_dict=weights, lineage=lineage)
    plot = None
    try:
        from tso.train.plots import plot_loss

        plot = str(plot_loss(work / METRICS_FILE, work / PLOT_FILE, title="judge fine-tuning"))
    except Exception as e:
        if log:
            log(f"[judge] plot failed: {e!r}")
    summary = {"kind": "summary", "judge_dir": str(judge_dir), "metrics": str(work / METRICS_FILE), "plot": plot,
               "examples": len(examples), "feedback": rep.to_dict(), **res}
    metrics.write({k: v for k, v in summary.items() if k != "feedback"})
    atomic_write_text(work / "summary.json", json.dumps(summary, indent=2, default=str))
    dist.barrier()
    return summary


def train_judge_local(job: JudgeJob, log=print) -> dict[str, Any]:
    """In-process judge fine-tuning (one worker), for tests, benchmarks and machines without Ray."""
    return run_judge_worker(job, log=log, checkpoints=False)
