"""The judge's evaluation correction (docs/method.md section 2): pi_eval = SFT(pi_base, D_feedback).

Feedback examples are JSONL records with ``messages``: the judge prompt as user turn(s) and the answer
"Evaluation evidence: ... Score: X.X" as the last assistant turn. The loss is the mean negative
log-likelihood of the answer tokens (EOS included); the prompt is context only. The same machinery as
policy training runs it: the engine (DeepSpeed or plain torch), sharding over workers, one checkpoint
per epoch for resuming, metrics JSONL, and an HF model directory with ``lineage.json`` at the end.
This module imports no ray; ``ray_trainer.train_judge`` runs ``run_judge_worker`` on Ray Train workers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tso.config import RunConfig, TrainConfig
from tso.method.logprobs import sequence_logprobs
from tso.train import dist
from tso.train.checkpoint import ResumeState, load_boundary, save_boundary
from tso.train.data import chunks, collate_sft_batch, encode_prompt, encode_response, prompt_text, seeded_rng, shard
from tso.train.engine import Engine, make_engine
from tso.train.export import atomic_write_text, lineage_record, save_hf_model
from tso.train.metrics import MetricsLog
from tso.train.stage import load_model_and_tokenizer
from tso.train.step import autocast

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "judge_loss.png"


@dataclass(frozen=True)
class SFTExample:
    id: str
    prompt: list[int]
    answer: list[int]  # answer tokens + EOS: the only tokens in the loss

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.answer)


@dataclass
class FeedbackReport:
    total: int = 0
    kept: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    too_long: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.kept}/{self.total} feedback examples kept"
        if self.malformed:
            s += f"; {len(self.malformed)} malformed lines rejected (first: line {self.malformed[0][0]}: {self.malformed[0][1]})"
        if self.too_long:
            s += f"; {len(self.too_long)} longer than max_length left out (ids: {', '.join(self.too_long[:5])})"
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "malformed": [list(m) for m in self.malformed],
                "too_long": self.too_long}


def split_messages(record: Any) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, answer): the last message must be the assistant's answer."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError("record has no 'messages' list")
    msgs = record["messages"]
    if len(msgs) < 2:
        raise ValueError("need at least a user turn and the assistant's answer")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message needs string 'role' and 'content'")
    if msgs[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"]


def read_feedback(path: str | Path, tokenizer, max_length: int, max_examples: int | None = None
                  ) -> tuple[list[SFTExample], FeedbackReport]:
    """Tokenize a feedback JSONL file; malformed lines are rejected with their line number and counted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feedback file")
    rep = FeedbackReport()
    out: list[SFTExample] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rep.total += 1
            try:
                record = json.loads(line)
                prompt_msgs, answer = split_messages(record)
                rid = str(record.get("id", f"line{n:07d}"))
                if rid in seen:
                    raise ValueError(f"duplicate id {rid!r}")
                text = prompt_text(tokenizer, prompt_msgs)
                prompt = encode_prompt(tokenizer, prompt_msgs)
            except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
                rep.malformed.append((n, str(e)))
                continue
            seen.add(rid)
            ans = encode_response(tokenizer, answer, after=(text, prompt))
            if len(prompt) + len(ans) > max_length:
                rep.too_long.append(rid)
                continue
            out.append(SFTExample(rid, prompt, ans))
    out.sort(key=lambda e: e.id)
    if max_examples is not None:
        out = out[:max_examples]
    rep.kept = len(out)
    return out, rep


def judge_train_config(cfg: RunConfig) -> TrainConfig:
    """The judge's schedule (judge.train) on the policy's machinery settings (workers, ZeRO, optimizer)."""
    t, j = cfg.train, cfg.judge.train
    data = t.model_dump()
    data.update(global_batch=j.global_batch, micro_batch=j.micro_batch, epochs=j.epochs, minibatches=1,
                reference="policy", max_length=j.max_length)
    data["optimizer"].update(lr=j.lr, warmup_ratio=j.warmup_ratio)
    return TrainConfig.model_validate(data)


def sft_step(engine: Engine, micro: list[list[SFTExample]], pad_id: int) -> dict[str, float]:
    if len(micro) != engine.grad_accum:
        raise ValueError(f"a step needs {engine.grad_accum} micro-batches per worker, got {len(micro)}")
    t0 = time.perf_counter()
    lr = engine.lr()
    engine.train()
    losses, tokens, examples = [], 0, 0
    for part in micro:
        batch = collate_sft_batch([(e.prompt, e.answer) for e in part], pad_id).to(engine.device)
        n_answer = int(batch.response_mask.sum())
        with autocast(engine):
            loss = -sequence_logprobs(engine.module, batch).sum() / max(n_answer, 1)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())
        tokens += batch.num_tokens
        examples += len(part)
    mean = dist.all_reduce_mean(torch.stack(losses).mean().reshape(1).cpu())
    counts = dist.all_reduce_sum(torch.tensor([tokens, examples], dtype=torch.float64))
    elapsed = time.perf_counter() - t0
    return {"loss": float(mean[0]), "grad_norm": engine.grad_norm(), "lr": lr, "tokens": int(counts[0]),
            "examples": int(counts[1]), "step_time_s": elapsed, "examples_per_s": float(counts[1]) / elapsed,
            "tokens_per_s": float(counts[0]) / elapsed}


def sft_total_steps(n: int, train: TrainConfig) -> int:
    if n < train.global_batch:
        raise ValueError(f"{n} feedback examples are fewer than one optimizer step "
                         f"(judge.train.global_batch = {train.global_batch})")
    return train.epochs * (n // train.global_batch)


def run_sft(engine: Engine, examples: Sequence[SFTExample], train: TrainConfig, *, pad_id: int,
            report=None, resume: ResumeState | None = None, metrics: MetricsLog | None = None, tokenizer=None,
            checkpoints: bool = True, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """E epochs over the examples (seeded order per epoch), a checkpoint after each epoch."""
    rank, world = dist.rank(), dist.world_size()
    G, E = train.global_batch, train.epochs
    per_epoch = len(examples) // G
    total = sft_total_steps(len(examples), train)
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
            out = sft_step(engine, [list(c) for c in chunks(mine, train.micro_batch)], pad_id)
            step += 1
            record = {"kind": "step", "stage": 0, "step": step, "epoch": e + 1, "step_in_epoch": s + 1,
                      "resumed_from": resumed_from, "time_s": time.perf_counter() - t_start, **out}
            first = first or record
            last = record
            if step % train.log_every == 0 or s == per_epoch - 1:
                say(f"[judge] step {step}/{total} epoch {e + 1}/{E} loss {out['loss']:.4f} "
                    f"|g| {out['grad_norm'] or 0:.3f} lr {out['lr']:.2e} {out['examples_per_s']:.1f} ex/s")
            metrics.write(record)
            epoch_losses.append(out["loss"])
            if report is not None:
                report(record, None)
        ckpt = None
        if checkpoints:
            ckpt = tempfile.mkdtemp(prefix=f"tso-judge-epoch{e + 1}-rank{rank}-")
            save_boundary(engine, ckpt, boundary=e + 1, step=step, stage=0, next_reference=None, meta=meta,
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
    engine: str = "deepspeed"
    threads: int | None = None
    fault: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the base's loading options

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)


def run_judge_worker(job: JudgeJob, report=None, resume_dir: str | Path | None = None,
                     log: Callable[[str], None] | None = print, checkpoints: bool = True) -> dict[str, Any] | None:
    if job.threads:
        torch.set_num_threads(job.threads)
    train = job.train_config
    work = Path(job.work_dir)
    rank = dist.rank()
    model, tokenizer = load_model_and_tokenizer(job.base_path, train, job.options)
    examples, rep = read_feedback(job.feedback_path, tokenizer, train.max_length, job.max_examples)
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / "rejects.json", json.dumps(rep.to_dict(), indent=2))
        if log:
            log(f"[judge] {job.feedback_path}: {rep.summary()}")
    engine = make_engine(job.engine, model, train, sft_total_steps(len(examples), train))
    resume = None
    if resume_dir is not None:
        resume = load_boundary(engine, resume_dir, {"examples": len(examples), "kind": "judge_sft", "stage": 0})
    metrics = MetricsLog(work / METRICS_FILE, enabled=rank == 0)
    res = run_sft(engine, examples, train, pad_id=tokenizer.pad_token_id, report=report, resume=resume,
                  metrics=metrics, tokenizer=tokenizer, checkpoints=checkpoints, log=log)
    weights = engine.full_state_dict()
    if rank != 0:
        dist.barrier()
        return None
    lineage = lineage_record(base=job.base_path, stage=0, kind="judge", data=job.feedback_path,
                             config_hash=job.config_hash, base_name=job.base_name, steps=res["steps"],
                             examples=len(examples), epochs=train.epochs, seed=train.seed)
    judge_dir = save_hf_model(engine.module, job.out_dir, tokenizer, state_dict=weights, lineage=lineage)
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


# ----------------------------------------------------------------------------- evaluation


def _ranks(x: np.ndarray) -> np.ndarray:
    order = x.argsort(kind="stable")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # average ranks of ties
        m = x == v
        ranks[m] = ranks[m].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def judge_outputs(model, tokenizer, prompts: Sequence[Sequence[dict]], max_new_tokens: int = 48,
                  batch_size: int = 16) -> list[str]:
    """Greedy judge answers for chat prompts (left-padded batches)."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    texts = []
    for i in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, list(p)) for p in prompts[i : i + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


def evaluate_judge(model_or_path, records: Sequence[dict], tokenizer=None, max_new_tokens: int = 48) -> dict[str, Any]:
    """Score held-out feedback records with a judge and compare against their target scores: parse rate,
    Spearman correlation, mean absolute error, and the fraction within 1 point (unscored counts as a miss)."""
    from tso.method.judging import extract_score

    if isinstance(model_or_path, (str, Path)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_or_path))
        model = AutoModelForCausalLM.from_pretrained(str(model_or_path), dtype=torch.float32)
    else:
        model = model_or_path
    prompts, truth = [], []
    for r in records:
        msgs, answer = split_messages(r)
        target = extract_score(answer)
        if target.score is None:
            raise ValueError(f"held-out record has no target score: {answer!r}")
        prompts.append(msgs)
        truth.append(target.score)
    outputs = judge_outputs(model, tokenizer, prompts, max_new_tokens)
    verdicts = [extract_score(o) for o in outputs]
    scored = [(v.score, t) for v, t in zip(verdicts, truth) if v.score is not None]
    n = len(records)
    within = sum(1 for v, t in zip(verdicts, truth) if v.score is not None and abs(v.score - t) <= 1.0)
    return {
        "n": n,
        "parse_rate": len(scored) / n if n else 0.0,
        "within_1": within / n if n else 0.0,
        "mae": float(np.mean([abs(s - t) for s, t in scored])) if scored else None,
        "spearman": spearman([s for s, _ in scored], [t for _, t in scored]) if scored else None,
        "unscored_reasons": {r: sum(1 for v in verdicts if v.reason == r) for r in {v.reason for v in verdicts if v.reason}},
        "outputs": outputs[:5],
    }
