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
- Several nodes (docs/cluster.md): workers read the pairs file and the base model at the driver's paths
  and write into the training directory, so those must be on storage every node mounts; before training
  the driver checks it with one probe task on each node a worker could run on (none on a one-node
  cluster). ``train.storage_path`` puts Ray's checkpoints on a shared path or a URI (``s3://...``),
  ``train.resources_per_worker`` adds resources each worker asks for (to pin training to some nodes),
  and each worker records where it ran in ``<training dir>/ray_workers/rank<r>.json``.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tso.cluster import connect_ray
from tso.config import RunConfig, is_hub_id
from tso.io import atomic_write_json, judge_dir, legacy_train_dir, train_dir
from tso.models.checkpoint import absolute_checkpoint
from tso.train.judge_sft import JudgeJob, judge_train_config, run_judge_worker
from tso.train.stage import PolicyJob, TrainResult, result_from_dir, run_policy_worker

DEFAULT_MAX_FAILURES = 2
WORKER_START_TIMEOUT_S = 300
PROBE_TIMEOUT_S = 120  # a probe task starts one worker process per node: seconds, unless the node is gone
PROBE_PREFIX = ".tso-storage-probe-"
WORKERS_DIR = "ray_workers"  # <training dir>/ray_workers/rank<r>.json: the node each rank ran on
DOCS = "docs/cluster.md"


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
    rank = ray.train.get_context().get_world_rank()
    _record_placement(config["record_dir"], rank, ray.train.get_context().get_world_size())
    report = _RayReport(config["checkpoint_prefix"], rank, job.fault)
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        worker(job, report=report)
        return
    with ckpt.as_directory() as d:
        worker(job, report=report, resume_dir=d)


def _record_placement(record_dir: str, rank: int, world_size: int) -> None:
    """Write where this rank runs (``tso run`` on several nodes: which node trained, from the run directory)."""
    import ray

    ctx = ray.get_runtime_context()
    atomic_write_json(Path(record_dir) / WORKERS_DIR / f"rank{rank}.json", {
        "rank": rank, "world_size": world_size, "node_id": ctx.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(), "pid": os.getpid()})


def read_placement(record_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The ranks' placement records of a training directory, by rank (the last attempt's)."""
    import json

    files = sorted((Path(record_dir) / WORKERS_DIR).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    records = [json.loads(p.read_text()) for p in files]
    size = records[0]["world_size"] if records else 0
    return [r for r in records if r["rank"] < size]  # a rerun with fewer workers leaves higher ranks behind


def worker_resources(train) -> dict[str, float]:
    """What one Train worker asks Ray for: Ray's default (1 CPU, or 1 GPU with use_gpu) plus
    ``train.resources_per_worker`` (which may also change CPU or GPU)."""
    return {**({"GPU": 1.0} if train.use_gpu else {"CPU": 1.0}), **(train.resources_per_worker or {})}


def ray_storage(train, work: Path) -> str:
    """Ray Train's storage for the training directory ``work``: ``<work>/ray``, or under ``train.storage_path``
    a subdirectory named after ``work`` (its path's digest), so the stages, baselines and runs that share one
    storage_path never restore each other's Ray runs, and a rerun of the same directory finds its own."""
    if not train.storage_path:
        return str(work / "ray")
    base, sep, query = train.storage_path.partition("?")  # URIs may carry options: s3://b/p?region=...
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{work.parent.name}-{work.name}").strip("-")
    key = hashlib.sha256(str(work).encode()).hexdigest()[:10]
    return f"{base.rstrip('/')}/{tail}-{key}{sep}{query}"


def _observe(path: str) -> tuple | str:
    """What this process sees at ``path``: a file's size, a directory's top-level files and sizes, or why not."""
    p = Path(path)
    try:
        if p.is_file():
            return ("file", p.stat().st_size)
        if p.is_dir():
            return ("dir", tuple(sorted((f.name, f.stat().st_size) for f in p.iterdir() if f.is_file())))
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return "missing"


def _storage_probe(inputs: dict[str, str], dirs: dict[str, str], token: str, node_id: str) -> dict[str, Any]:
    """On one node: what it sees of the inputs, and whether it reads the driver's probe file in each output
    directory and can write one of its own there."""
    seen: dict[str, Any] = {label: _observe(path) for label, path in inputs.items()}
    for label, d in dirs.items():
        try:
            if (Path(d) / f"{PROBE_PREFIX}{token}").read_text() != token:
                raise OSError(0, "other content")
        except OSError as e:
            seen[label] = f"the driver's probe file is not there ({e.strerror or e})"
            continue
        try:
            (Path(d) / f"{PROBE_PREFIX}{token}-{node_id}").write_text(token)
        except OSError as e:
            seen[label] = f"not writable ({e.strerror})"
            continue
        seen[label] = "shared"
    return seen


def storage_problems(paths: dict[str, str], expected: dict[str, Any], seen: dict[str, Any]) -> list[str]:
    """Where a node's view differs from the driver's, one sentence each."""
    out = []
    for label, want in expected.items():
        got = seen.get(label, "missing")
        if got == want:
            continue
        if isinstance(got, str):
            out.append(f"{label} {paths[label]}: {got}")
        elif got[0] == "file" and want[0] == "file":
            out.append(f"{label} {paths[label]}: a different file ({got[1]} bytes, the driver sees {want[1]})")
        else:
            out.append(f"{label} {paths[label]}: a different {got[0]} than the driver's")
    return out


def check_shared_storage(inputs: dict[str, str], dirs: dict[str, Path], resources: dict[str, float]) -> list[str]:
    """Before training, in the driver: every node a Train worker could run on (it has ``resources``) sees the
    inputs as the driver does and shares the output directories, checked by one probe task per node (none on
    a one-node cluster). Raises ValueError naming the node otherwise; returns the node ids checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return []
    fits = [n for n in nodes if all(n["Resources"].get(k, 0) >= v for k, v in resources.items() if v > 0)]
    if not fits:
        print(f"[tso] storage check: no node has {resources} yet (the autoscaler may add one); not checked")
        return []
    token = secrets.token_hex(8)
    probe_dirs = {label: str(d) for label, d in dirs.items()}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{PROBE_PREFIX}{token}").write_text(token)
    expected = {**{label: _observe(p) for label, p in inputs.items()}, **{label: "shared" for label in dirs}}
    probe = ray.remote(num_cpus=0, max_retries=0)(_storage_probe)
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(inputs, probe_dirs, token, n["NodeID"]): n for n in fits}
    try:
        done, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        problems, checked = [], []
        for ref in done:
            node = refs[ref]
            name = f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]})"
            try:
                seen = ray.get(ref)
            except ray.exceptions.RayError as e:  # the node died meanwhile: Ray Train will not place a worker there
                print(f"[tso] storage check: {name} could not be probed ({type(e).__name__}); not checked")
                continue
            for label, d in dirs.items():  # the node's own probe file must reach the driver
                if seen.get(label) == "shared" and not (d / f"{PROBE_PREFIX}{token}-{node['NodeID']}").is_file():
                    seen[label] = "the node's writes there do not reach the driver"
            problems += [f"{name}: {p}" for p in storage_problems({**inputs, **probe_dirs}, expected, seen)]
            checked.append(node["NodeID"])
        for ref in late:
            ray.cancel(ref, force=True)
            node = refs[ref]
            print(f"[tso] storage check: node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) did not answer "
                  f"within {PROBE_TIMEOUT_S} s; not checked")
    finally:
        for d in dirs.values():
            for f in d.glob(f"{PROBE_PREFIX}{token}*"):
                f.unlink(missing_ok=True)
    if problems:
        raise ValueError("Train workers would not see the files the driver sees:\n  " + "\n  ".join(problems)
                         + "\nrun_dir, the pairs file and the base model must be on storage every node mounts "
                         f"at the same path (a shared filesystem; train.storage_path may be a URI), see {DOCS}")
    print(f"[tso] storage check: {len(checked)} node(s) where Train workers can run see the inputs and the "
          f"training directory as the driver does")
    return checked


def _local_inputs(**paths: str) -> dict[str, str]:
    """The inputs workers read from disk (a hub id is downloaded, not read from a shared path)."""
    return {label.replace("_", " "): p for label, p in paths.items() if p and not is_hub_id(p)}


def _fit(kind: str, job, train, work: Path, name: str, checkpoint_prefix: str, max_failures: int,
         env: dict[str, str] | None, inputs: dict[str, str], dirs: dict[str, Path]):
    """Run one Ray Train job; ``work`` is the training directory (placement records, default storage)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    # Worker start (torch, transformers, DeepSpeed imports) can outlast Ray Train's 60 s default on a busy
    # small machine; the driver's value propagates to the controller. An explicit setting wins.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(WORKER_START_TIMEOUT_S))
    connect_ray()
    resources = worker_resources(train)
    check_shared_storage(inputs, dirs, resources)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"kind": kind, "job": asdict(job), "checkpoint_prefix": checkpoint_prefix,
                           "record_dir": str(work)},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(
            name=name,
            storage_path=ray_storage(train, work),
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
    nodes = sorted({(r["node_ip"], r["node_id"][:12]) for r in read_placement(work)})
    if nodes:
        print(f"[tso] {name}: {train.num_workers} worker(s) ran on " + ", ".join(f"{ip} ({nid})" for ip, nid in nodes))
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
    from tso.train.stage import check_model_settings

    check_model_settings(train)
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
    from tso.train.stage import check_model_settings

    check_model_settings(train)
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
    result = _fit("policy", job, cfg.train, out, run_name(cfg, f"stage{stage}"), f"stage{stage}", max_failures, env,
                  _local_inputs(pairs_file=job.pairs_path, base_model=job.base_path), {"training directory": out})
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
    _fit("judge", job, train, work, run_name(cfg, "judge"), "judge_epoch", max_failures, env,
         _local_inputs(feedback_file=job.feedback_path, base_model=job.base_path),
         {"training directory": work, "judge's parent directory": out.parent})
    return json.loads((work / "summary.json").read_text())
