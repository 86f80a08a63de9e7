"""Supervised fine-tuning on answer tokens (the judge's evaluation correction), on a training backend.

The loss is the mean negative log-likelihood of the answer tokens (the end token included); the
prompt is context only. E epochs over the examples in a seeded order per epoch, sharded over
workers like policy training, with a checkpoint after each epoch for resuming (written under
``scratch_dir``, the worker's ``<work_dir>/.tmp``). No ray here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tso.config import TrainConfig
from tso.method.logprobs import sequence_logprobs
from tso.train import dist
from tso.train.backend import TrainBackend
from tso.train.checkpoint import ResumeState, save_boundary
from tso.train.data import chunks, collate_sft_batch, seeded_rng, shard
from tso.train.feedback import SFTExample
from tso.train.metrics import MetricsLog, log_interval
from tso.train.step import autocast


def sft_step(backend: TrainBackend, micro: list[list[SFTExample]], pad_id: int) -> dict[str, float]:
    if len(micro) != backend.grad_accum:
        raise ValueError(f"a step needs {backend.grad_accum} micro-batches per worker, got {len(micro)}")
    t0 = time.perf_counter()
    lr = backend.lr()
    backend.train()
    losses, tokens, examples = [], 0, 0
    for part in micro:
        batch = collate_sft_batch([(e.prompt, e.answer) for e in part], pad_id).to(backend.device)
        n_answer = int(batch.response_mask.sum())
        with autocast(backend):
            loss = -sequence_logprobs(backend.module, batch).sum() / max(n_answer, 1)
        backend.backward(loss)
        backend.step()
        losses.append(loss.detach().float())
        tokens += batch.num_tokens
        examples += len(part)
    mean = dist.all_reduce_mean(torch.stack(losses).mean().reshape(1).cpu())
    counts = dist.all_reduce_sum(torch.tensor([tokens, examples], dtype=torch.float64))
    elapsed = time.perf_counter() - t0
    return {"loss": float(mean[0]), "grad_norm": backend.grad_norm(), "lr": lr, "tokens": int(counts[0]),
            "examples": int(counts[1]), "step_time_s": elapsed, "examples_per_s": float(counts[1]) / elapsed,
            "tokens_per_s": float(counts[0]) / elapsed}


def sft_total_steps(n: int, train: TrainConfig) -> int:
    if n < train.global_batch:
        raise ValueError(f"{n} feedback examples are fewer than one optimizer step "
                         f"(judge.train.global_batch = {train.global_batch})")
    return train.epochs * (n // train.global_batch)


def run_sft(backend: TrainBackend, examples: Sequence[SFTExample], train: TrainConfig, *, pad_id: int,
            report=None, resume: ResumeState | None = None, metrics: MetricsLog | None = None, tokenizer=None,
            checkpoints: bool = True, log: Callable[[str], None] | None = print,
            scratch_dir: str | Path | None = None) -> dict[str, Any]:
    """E epochs over the examples (seeded order per epoch), a checkpoint after each epoch (in
    ``scratch_dir``; None is the system temp dir)."""
    rank, world = dist.rank(), dist.world_size()
    G, E = train.global_batch, train.epochs
    per_epoch = len(examples) // G
    total = sft_total_steps(len(examples), train)
    every = log_interval(train.log_every, total)
    metrics = metrics or MetricsLog(None)
    say = log if (log is not None and rank == 0) else (lambda _s: None)
    t_start = time.perf_counter()
    start_epoch, step = (resume.boundary, resume.step) if resume else (0, 0)
    resumed_from = resume.boundary if resume else None
    meta = {"examples": len(examples), "kind": "judge_sft", "stage": 0}
    first = last = None
    for e in range(start_epoch, E):
        order = seeded_rng(train.seed, 0, 0xF00D, e + 1).permutation(len(examples))
        epoch_losses: list[float] = []
        for s in range(per_epoch):
            idx = order[s * G : (s + 1) * G].tolist()
            mine = [examples[i] for i in shard(idx, rank, world)]
            out = sft_step(backend, [list(c) for c in chunks(mine, train.micro_batch)], pad_id)
            step += 1
            record = {"kind": "step", "stage": 0, "step": step, "epoch": e + 1, "step_in_epoch": s + 1,
                      "resumed_from": resumed_from, "time_s": time.perf_counter() - t_start, **out}
            first = first or record
            last = record
            if step % every == 0 or s == per_epoch - 1:
                say(f"[judge] step {step}/{total} epoch {e + 1}/{E} loss {out['loss']:.4f} "
                    f"|g| {out['grad_norm'] or 0:.3f} lr {out['lr']:.2e} {out['examples_per_s']:.1f} ex/s")
            metrics.write(record)
            epoch_losses.append(out["loss"])
            if report is not None:
                report(record, None)
        ckpt = None
        if checkpoints:
            ckpt = tempfile.mkdtemp(prefix=f"tso-judge-epoch{e + 1}-rank{rank}-", dir=scratch_dir)
            save_boundary(backend, ckpt, boundary=e + 1, step=step, stage=0, next_reference=None, meta=meta,
                          tokenizer=tokenizer)
        boundary = {"kind": "boundary", "stage": 0, "boundary": e + 1, "epochs": E, "step": step,
                    "resumed_from": resumed_from, "time_s": time.perf_counter() - t_start,
                    "epoch_mean_loss": sum(epoch_losses) / len(epoch_losses)}
        metrics.write(boundary)
        try:
            if report is not None:
                report(boundary, ckpt)
        finally:
            if ckpt:
                shutil.rmtree(ckpt, ignore_errors=True)
    return {"steps": step, "total_steps": total, "first_loss": first["loss"] if first else None,
            "last_loss": last["loss"] if last else None, "resumed_from": resumed_from,
            "wall_time_s": time.perf_counter() - t_start}
