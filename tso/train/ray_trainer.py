"""Ray Train (v2) wrappers: the training core on ``TorchTrainer`` workers, each with a DeepSpeed engine.

- ``ScalingConfig(num_workers, use_gpu)`` from ``train``; torch.distributed (gloo on CPU, nccl on GPU)
  is set up by Ray Train and DeepSpeed joins that process group.
- At every mini-batch boundary each worker saves its part of the checkpoint and calls
  ``ray.train.report(metrics, checkpoint=Checkpoint.from_directory(...))``; Ray merges the workers'
  directories into ``<out>/ray/<run name>-stage<N>/stage<N>_boundary_<k>``.
- ``FailureConfig(max_failures)``: when a worker dies, Ray Train restarts the worker group; each worker
  loads ``ray.train.get_checkpoint()`` and resumes at the next mini-batch. Re-running the same command
  on the same output directory resumes the same way (Ray restores the run from its storage path).
- Metrics: every step goes to the log and (rank 0) to ``<out>/metrics.jsonl``; ``ray.train.report``
  gets one report per boundary (the mini-batch's mean loss, rewards, margin, accuracy, gradient scale,
  its first step's gradient scale, throughput) with the checkpoint. Ray Train's controller takes one
  report per health-check poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s) and a worker's report
  queue holds one, so a report per step would hold every step for up to 2 s. After a boundary report
  the workers wait until Ray has committed that checkpoint before training on, so a failure after a
  boundary never redoes the mini-batch before it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tso.cluster import connect_ray
from tso.config import RunConfig
from tso.io import judge_dir, legacy_train_dir, train_dir
from tso.models.checkpoint import absolute_checkpoint
from tso.train.judge_sft import JudgeJob, judge_train_config, run_judge_worker
from tso.train.stage import PolicyJob, TrainResult, result_from_dir, run_policy_worker

DEFAULT_MAX_FAILURES = 2
WORKER_START_TIMEOUT_S = 300


class _RayReport:
    """The core's ``report(metrics, checkpoint_dir | None)`` as ``ray.train.report``."""

    def __init__(self, prefix: str, rank: int, fault: dict[str, Any] | None = None):
        self.prefix, self.rank, self.fault = prefix, rank, fault

    def _maybe_die(self, metrics: dict[str, Any]) -> None:
        """Test hook: really kill this worker process once, at a chosen step, guarded by a marker file."""
        f = self.fault
        if not f or metrics.get("kind") != "step" or metrics.get("step") != f["step"] or self.rank != f.get("rank", 0):
            return
        marker = Path(f["marker"])
        if marker.exists():
            return
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        self._maybe_die(metrics)
        if checkpoint_dir is None and metrics.get("kind") != "boundary":
            return  # step metrics: JSONL and log only (see the module docstring)
        clean = {k: v for k, v in metrics.items() if v is not None}
        if checkpoint_dir is None:
            ray.train.report(clean)
            return
        name = f"{self.prefix}_boundary_{metrics['boundary']:02d}"
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_dir_name=name)
        # A report is queued until the controller's next poll: wait until this boundary is committed, so
        # a failure after it never sends the run back to an earlier boundary (costs <= 2 s per boundary).
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _threads(job_threads: int | None) -> int:
    if job_threads:
        return job_threads
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))


# kind -> (job class, the worker function, the prefix of its boundary checkpoints' names)
_WORKERS = {"policy": (PolicyJob, run_policy_worker), "judge": (JudgeJob, run_judge_worker)}


def _train_loop(config: dict[str, Any]) -> None:
    """A Ray Train worker: the job's worker function, resumed from Ray's checkpoint when there is one."""
    import ray.train

    job_type, worker = _WORKERS[config["kind"]]
    job = job_type(**config["job"])
    job.threads = _threads(job.threads)
    report = _RayReport(config["checkpoint_prefix"], ray.train.get_context().get_world_rank(), job.fault)
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        worker(job, report=report)
        return
    with ckpt.as_directory() as d:
        worker(job, report=report, resume_dir=d)


def _fit(kind: str, job, train, storage: Path, name: str, checkpoint_prefix: str, max_failures: int,
         env: dict[str, str] | None):
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    # Worker start (torch, transformers, DeepSpeed imports) can outlast Ray Train's 60 s default on a busy
    # small machine; the driver's value propagates to the controller. An explicit setting wins.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(WORKER_START_TIMEOUT_S))
    connect_ray()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"kind": kind, "job": asdict(job), "checkpoint_prefix": checkpoint_prefix},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu),
        run_config=RayRunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),  # the newest: resume needs no other
            # Train's print patch tees each worker print to its logger and to the worker's (already
            # forwarded) stdout: every progress line reached the job log twice. Prints stay prints.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **(env or {})}},
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return result


def run_name(cfg: RunConfig, what: str) -> str:
    """The Ray Train run's name: the run's name too, so two runs on one cluster tell apart in the dashboard."""
    return f"{cfg.name}-{what}"


def preflight_policy(train, pairs_path: str, base_path: str, stage: int, options: dict | None = None) -> str:
    """Check inputs in the driver, before any worker starts, so bad input is a clear error and not a
    worker stack trace: the model directory, the pairs file, and that every mini-batch holds a step."""
    from tso.models.checkpoint import load_tokenizer, require_checkpoint
    from tso.train.data import read_pairs, tokenize_pairs
    from tso.train.minibatch import plan_stage

    require_checkpoint(base_path)
    tokenizer = load_tokenizer(base_path, options)
    pairs, rep = tokenize_pairs(read_pairs(pairs_path), tokenizer, train.max_length)
    if not pairs:
        raise ValueError(f"{pairs_path}: no trainable pairs ({rep.summary()})")
    plan_stage(len(pairs), train, stage)
    return rep.summary()


def preflight_judge(train, feedback_path: str, base_path: str, max_examples: int | None,
                    options: dict | None = None) -> str:
    """The judge's inputs, checked in the driver: model directory, feedback file, at least one step."""
    from tso.models.checkpoint import load_tokenizer, require_checkpoint
    from tso.train.feedback import read_feedback
    from tso.train.sft import sft_total_steps

    require_checkpoint(base_path)
    tokenizer = load_tokenizer(base_path, options)
    examples, rep = read_feedback(feedback_path, tokenizer, train.max_length, max_examples)
    try:
        sft_total_steps(len(examples), train)
    except ValueError as e:
        raise ValueError(f"{feedback_path}: {e} ({rep.summary()})") from None
    return rep.summary()


def default_policy_out(cfg: RunConfig, stage: int) -> Path:
    """``<run_dir>/stage-<t>/train``, where ``tso run`` trains too. A directory in the layout `tso train`
    wrote before (``<run_dir>/train/stage<t>``) is refused with what to do, never silently ignored."""
    legacy = legacy_train_dir(cfg.run_dir, stage)
    out = train_dir(cfg.run_dir, stage)
    if legacy.is_dir() and not out.exists():
        raise ValueError(f"{legacy} is a training directory of an older tso layout; tso now trains stage {stage} in "
                         f"{out}: move it there (mv {legacy} {out}) to resume it, or pass --out {legacy}")
    return out


def base_model_path(cfg: RunConfig) -> tuple[str, str]:
    entry = cfg.matrix.entry(cfg.matrix.base)
    return entry.path, entry.name


def base_options(cfg: RunConfig) -> dict[str, Any]:
    from tso.models.checkpoint import checkpoint_options

    return checkpoint_options(cfg.matrix.entry(cfg.matrix.base))


def train_policy(cfg: RunConfig, pairs_path: str | os.PathLike, base_path: str | os.PathLike | None = None,
                 out_dir: str | os.PathLike | None = None, stage: int = 1, *,
                 max_failures: int = DEFAULT_MAX_FAILURES, backend: str = "deepspeed",
                 threads_per_worker: int | None = None, fault: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> TrainResult:
    """Train one TSO stage on Ray Train: mini-batch iterative DPO with the reference hot-swap.

    ``base_path`` defaults to the matrix's base entry; ``out_dir`` to ``<run_dir>/stage-<N>/train``.
    Returns the paths of the new policy version (HF directory with lineage.json), metrics and plot.
    ``fault`` is for tests: ``{"step": n, "rank": r, "marker": path}`` kills that worker once.
    """
    base_name = None
    if base_path is None:
        base_path, base_name = base_model_path(cfg)
    out = Path(out_dir or default_policy_out(cfg, stage)).absolute()
    job = PolicyJob(train=cfg.train.model_dump(mode="json"), pairs_path=str(Path(pairs_path).absolute()),
                    base_path=absolute_checkpoint(base_path), out_dir=str(out), stage=stage, base_name=base_name,
                    config_hash=cfg.config_hash(), backend=backend, threads=threads_per_worker, fault=fault,
                    options=base_options(cfg))
    preflight_policy(cfg.train, job.pairs_path, job.base_path, stage, job.options)
    result = _fit("policy", job, cfg.train, out / "ray", run_name(cfg, f"stage{stage}"), f"stage{stage}",
                  max_failures, env)
    checkpoints = [c.path for c, _ in (result.best_checkpoints or [])]
    return result_from_dir(out, checkpoints)


def default_judge_out(cfg: RunConfig) -> Path:
    return Path(cfg.judge.path) if cfg.judge.path else judge_dir(cfg.run_dir)


def train_judge(cfg: RunConfig, feedback_path: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                base_path: str | os.PathLike | None = None, *, max_failures: int = DEFAULT_MAX_FAILURES,
                backend: str = "deepspeed", threads_per_worker: int | None = None, fault: dict[str, Any] | None = None,
                env: dict[str, str] | None = None) -> dict[str, Any]:
    """Fine-tune the base model into the judge on feedback examples (answer tokens only), on Ray Train.

    Writes the judge as an HF directory at ``out_dir`` (default ``judge.path`` or ``<run_dir>/judge``) and
    its metrics, loss plot and checkpoints beside it in ``<out_dir>_train/``. Returns the summary.
    """
    import json

    feedback = feedback_path or cfg.judge.feedback
    if not feedback:
        raise ValueError("no feedback file: pass --feedback or set judge.feedback in the config")
    base_name = None
    if base_path is None:
        base_path, base_name = base_model_path(cfg)
    out = Path(out_dir or default_judge_out(cfg)).absolute()
    work = out.with_name(out.name + "_train")
    train = judge_train_config(cfg)
    job = JudgeJob(train=train.model_dump(mode="json"), feedback_path=str(Path(feedback).absolute()),
                   base_path=absolute_checkpoint(base_path), out_dir=str(out), work_dir=str(work),
                   config_hash=cfg.config_hash(), base_name=base_name, max_examples=cfg.judge.train.max_examples,
                   backend=backend, threads=threads_per_worker, fault=fault, options=base_options(cfg))
    preflight_judge(train, job.feedback_path, job.base_path, job.max_examples, job.options)
    _fit("judge", job, train, work / "ray", run_name(cfg, "judge"), "judge_epoch", max_failures, env)
    return json.loads((work / "summary.json").read_text())
