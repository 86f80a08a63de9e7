"""Mini-batch iterative DPO (docs/method.md section 4): the loop a Ray Train worker runs, without Ray.

    shuffle D_pref (seeded, after sorting by id), split it into K mini-batches B_1..B_K
    ref <- log-probs of B_1 under the policy at the start of the stage
    for k in 1..K:
        train E epochs on B_k against ref          (one optimizer, one LR schedule for all K x E epochs)
        boundary k: ref <- log-probs of B_{k+1} under the policy now (eval mode, no grad: the hot-swap);
                    checkpoint (weights, optimizer/schedule, RNG, k, ref); report

Each worker trains on its slice of every optimizer step. ``report(metrics, checkpoint_dir | None)`` is
called on every worker after every step (no checkpoint) and at each boundary (with this worker's
checkpoint directory, written under ``scratch_dir`` and deleted when ``report`` returns, and the
mini-batch's mean metrics): the Ray
wrapper forwards the boundary reports to ``ray.train.report``. ``resume`` (from
``checkpoint.load_boundary``) restarts after boundary k.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tso.config import TrainConfig
from tso.io import json_digest
from tso.train import dist
from tso.train.backend import TrainBackend
from tso.train.checkpoint import ResumeState, save_boundary
from tso.train.data import (
    TokenizedPair,
    collate_pair_batch,
    epoch_steps,
    length_grouped_micro_batches,
    pairs_digest,
    shard,
    split_minibatches,
)
from tso.train.metrics import MetricsLog, format_step, log_interval
from tso.train.reference import RefLogps, lookup, timed_reference
from tso.train.step import MicroBatch, train_step

ReportFn = Callable[[dict[str, Any], "str | None"], None]


@dataclass
class StagePlan:
    minibatches: list[list[int]]  # indices into the id-sorted pairs
    steps_per_epoch: list[int]
    epochs: int

    @property
    def total_steps(self) -> int:
        return self.epochs * sum(self.steps_per_epoch)

    def steps_before(self, k: int) -> int:
        """Optimizer steps taken before mini-batch k (0-based) starts."""
        return self.epochs * sum(self.steps_per_epoch[:k])


def plan_stage(num_pairs: int, train: TrainConfig, stage: int = 0) -> StagePlan:
    """The K mini-batches and their step counts; a mini-batch smaller than one optimizer step is an error."""
    minis = split_minibatches(num_pairs, train.minibatches, train.seed, stage)
    for k, m in enumerate(minis):
        if len(m) < train.global_batch:
            raise ValueError(
                f"mini-batch {k + 1} of {len(minis)} has {len(m)} pairs, fewer than one optimizer step "
                f"(train.global_batch = {train.global_batch}) for {num_pairs} pairs; lower train.global_batch "
                "or train.minibatches, or bring more pairs"
            )
    return StagePlan(minis, [len(m) // train.global_batch for m in minis], train.epochs)


# settings that change neither the training nor its checkpoints: a resume may change them
NOT_HASHED = {"keep_checkpoints", "log_every"}


def train_config_hash(train: TrainConfig) -> str:
    return json_digest(train.model_dump(mode="json", exclude=NOT_HASHED))


def checkpoint_meta(pairs: Sequence[TokenizedPair], train: TrainConfig, stage: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run."""
    return {"pairs_digest": pairs_digest(pairs), "minibatches": train.minibatches, "stage": stage,
            "train_config_hash": train_config_hash(train), "reference": train.reference}


@dataclass
class LoopResult:
    steps: int = 0
    total_steps: int = 0
    pairs_trained: int = 0
    tokens_trained: int = 0
    train_time_s: float = 0.0
    reference_time_s: float = 0.0
    checkpoint_time_s: float = 0.0
    wall_time_s: float = 0.0
    resumed_from: int | None = None
    boundaries: list[dict[str, Any]] = field(default_factory=list)
    last_step: dict[str, Any] | None = None

    @property
    def pairs_per_s(self) -> float:
        """Pairs trained per second of training, reference passes included (checkpoints not)."""
        busy = self.train_time_s + self.reference_time_s
        return self.pairs_trained / busy if busy else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["pairs_per_s"] = self.pairs_per_s
        return d


SUMMARY_KEYS = ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "grad_scale", "grad_norm")


def minibatch_summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over a mini-batch's steps, its first step's gradient scale (0.5: the reference was just
    swapped) and its last step's loss; what a boundary report carries."""
    if not steps:
        return {}
    out: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        vals = [s[key] for s in steps if s.get(key) is not None]
        if vals:
            out[f"mb_mean_{key}"] = sum(vals) / len(vals)
    time_s = sum(s["step_time_s"] for s in steps)
    out.update(mb_steps=len(steps), first_grad_scale=steps[0]["grad_scale"], last_loss=steps[-1]["loss"],
               mb_pairs_per_s=sum(s["pairs"] for s in steps) / time_s if time_s else None)
    return out


def _mode_ok(train: TrainConfig, ref_module) -> None:
    if train.reference == "frozen_copy" and ref_module is None:
        raise ValueError("train.reference = frozen_copy needs a reference model (ref_module)")
    if train.reference == "policy" and ref_module is not None:
        raise ValueError("train.reference = policy computes the reference with the policy; pass no ref_module")


def make_frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The comparison mode's second model: a copy that follows the policy at boundaries only."""
    ref = copy.deepcopy(getattr(model, "module", model))
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def run_minibatch_dpo(
    backend: TrainBackend,
    pairs: Sequence[TokenizedPair],
    train: TrainConfig,
    *,
    pad_id: int,
    stage: int = 0,
    plan: StagePlan | None = None,
    report: ReportFn | None = None,
    resume: ResumeState | None = None,
    ref_module: torch.nn.Module | None = None,
    metrics: MetricsLog | None = None,
    tokenizer=None,
    checkpoints: bool = True,
    scratch_dir: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    pad_to_multiple_of: int | None = None,
) -> LoopResult:
    """Train one stage. Every worker calls this with the same ``pairs`` (id-sorted) and config.
    Boundary checkpoints go to ``scratch_dir`` (workers pass ``checkpoint.scratch_dir(out_dir, rank)``;
    None is the system temp dir, for callers without an output directory)."""
    _mode_ok(train, ref_module)
    t_start = time.perf_counter()
    plan = plan or plan_stage(len(pairs), train, stage)
    K, E, G = len(plan.minibatches), train.epochs, train.global_batch
    rank, world = dist.rank(), dist.world_size()
    if G % world:
        raise ValueError(f"global_batch {G} is not divisible by {world} workers")
    meta = checkpoint_meta(pairs, train, stage)
    metrics = metrics or MetricsLog(None)
    say = log if (log is not None and rank == 0) else (lambda _s: None)
    ref_batch = train.reference_batch or 4 * train.micro_batch  # no gradients: larger batches fit
    autocast_dtype = getattr(backend, "autocast_dtype", None)
    res = LoopResult(total_steps=plan.total_steps)
    every = log_interval(train.log_every, plan.total_steps)

    start_k, step, reference = 0, 0, None
    if resume is not None:
        if resume.stage != stage:
            raise ValueError(f"resume state is for stage {resume.stage}, not stage {stage}")
        start_k, step, reference = resume.boundary, resume.step, resume.reference
        if step != plan.steps_before(start_k):
            raise ValueError(f"checkpoint at boundary {start_k} has step {step}, expected {plan.steps_before(start_k)}")
        res.resumed_from = start_k
        say(f"[stage {stage}] resuming after mini-batch {start_k}/{K} (step {step}/{plan.total_steps})")
    res.steps = step
    if ref_module is not None:  # frozen copy: it equals the policy at the start and at every boundary
        ref_module.load_state_dict(backend.module.state_dict())

    def emit(record: dict[str, Any], ckpt: str | None = None) -> None:
        record = {"stage": stage, "resumed_from": res.resumed_from, "time_s": time.perf_counter() - t_start, **record}
        metrics.write(record)
        if report is not None:
            report(record, ckpt)

    def reference_pass(k: int) -> RefLogps:
        ref, secs = timed_reference(backend.module, pairs, plan.minibatches[k], pad_id, ref_batch, autocast_dtype)
        res.reference_time_s += secs
        say(f"[stage {stage}] reference log-probs of mini-batch {k + 1}/{K}: {len(ref)} pairs in {secs:.2f}s")
        metrics.write({"kind": "reference", "stage": stage, "minibatch": k + 1, "step": step, "pairs": len(ref),
                       "reference_time_s": secs, "resumed_from": res.resumed_from})
        return ref

    for k in range(start_k, K):
        mini = plan.minibatches[k]
        if train.reference == "policy" and reference is None:
            reference = reference_pass(k)
        say(f"[stage {stage}] mini-batch {k + 1}/{K}: {len(mini)} pairs, {E} epochs x {plan.steps_per_epoch[k]} steps")
        mb_steps: list[dict[str, Any]] = []
        for e in range(E):
            steps, dropped = epoch_steps(mini, G, train.seed, stage, k, e)
            for s, global_idx in enumerate(steps):
                mine = shard(global_idx, rank, world)
                micro = []
                for part in length_grouped_micro_batches(pairs, mine, train.micro_batch):
                    batch = collate_pair_batch(pairs, part, pad_id, pad_to_multiple_of)
                    rc, rr = lookup(reference, pairs, part) if reference is not None else (None, None)
                    micro.append(MicroBatch(batch, rc, rr))
                out = train_step(backend, micro, train.loss, ref_module)
                step += 1
                res.steps = step
                res.pairs_trained += out["pairs"]
                res.tokens_trained += out["tokens"]
                res.train_time_s += out["step_time_s"]
                record = {"kind": "step", "step": step, "minibatch": k + 1, "epoch": e + 1, "step_in_epoch": s + 1,
                          "dropped_in_epoch": dropped, **out}
                res.last_step = record
                mb_steps.append(out)
                if step % every == 0 or s == len(steps) - 1:
                    say(format_step({"stage": stage, **record}, plan.total_steps, K, E))
                emit(record)
        # ---- boundary k+1: swap the reference to the policy as it is now, then checkpoint
        next_ref = None
        if k + 1 < K:
            if train.reference == "policy":
                next_ref = reference_pass(k + 1)
            else:
                ref_module.load_state_dict(backend.module.state_dict())
        boundary = {"kind": "boundary", "boundary": k + 1, "minibatches": K, "step": step,
                    "total_steps": plan.total_steps, "next_minibatch": k + 2 if k + 1 < K else None,
                    **minibatch_summary(mb_steps)}
        ckpt_dir = None
        if checkpoints:
            t0 = time.perf_counter()
            ckpt_dir = tempfile.mkdtemp(prefix=f"tso-boundary{k + 1}-rank{rank}-", dir=scratch_dir)
            save_boundary(backend, ckpt_dir, boundary=k + 1, step=step, stage=stage, next_reference=next_ref,
                          meta=meta, tokenizer=tokenizer)
            res.checkpoint_time_s += time.perf_counter() - t0
        res.boundaries.append(boundary)
        say(f"[stage {stage}] boundary {k + 1}/{K} at step {step}" + (" (checkpoint saved)" if ckpt_dir else ""))
        try:
            emit(boundary, ckpt_dir)
        finally:
            if ckpt_dir:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
        reference = next_ref
    res.wall_time_s = time.perf_counter() - t_start
    return res
