"""`tso run`: judge correction (stage 0), then T stages of pair formation, mini-batch iterative DPO
and registration of the new policy in the matrix, then evaluation and the report.

Every step writes its artifacts atomically under the run directory and is skipped when its
done-marker is there and agrees with its artifacts (tso.run.markers), so running the same command
again after an interruption resumes after the last completed step. One process runs a run directory
at a time (``.tso.lock``). Layout of a run directory:

    run.json, config.yaml       what ran (config hash, phase timings, status)
    judge/                      the corrected judge (stage 0), judge_train/ its metrics
    stage-<t>/pairs/            pairs.parquet, summary.json, rejects.jsonl
    stage-<t>/train/            policy/ (the new matrix version), metrics.jsonl, training.png
    baselines/<name>/           the same layout for each baseline run
    eval/                       <label>.json and <label>.answers.jsonl per evaluated model
    report.md                   tables and plots
"""

from __future__ import annotations

import time
from pathlib import Path

from tso.cluster import connect_ray
from tso.config import ModelEntry, RunConfig, deep_merge, dump_config, method_overrides, parse_config, resolve_config_ref
from tso.io import atomic_write_json, atomic_write_text, baseline_run_dir, eval_dir, judge_dir, pairs_dir, run_dir_lock, train_dir
from tso.models.checkpoint import OPTION_KEYS, checkpoint_options, derived_options
from tso.run.markers import judge_done, pairs_done, read_json_marker, training_done


class Timer:
    """Wall time per phase, printed as it goes and kept for the report. A scoped timer (a baseline's)
    prefixes its phase names and adds to the same table."""

    def __init__(self, phases: dict[str, float] | None = None, prefix: str = ""):
        self.phases: dict[str, float] = {} if phases is None else phases
        self.prefix = prefix

    def scoped(self, prefix: str) -> Timer:
        return Timer(self.phases, f"{self.prefix}{prefix}")

    def run(self, name: str, fn, *args, **kwargs):
        name = self.prefix + name
        start = time.perf_counter()
        print(f"[tso] >>> {name}", flush=True)
        try:
            return fn(*args, **kwargs)
        finally:
            took = time.perf_counter() - start
            self.phases[name] = self.phases.get(name, 0.0) + took
            print(f"[tso] <<< {name}: {took:.1f} s", flush=True)


def _metric(name: str, description: str):
    """A Ray custom metric (shown by the dashboard's Prometheus/Grafana), or None outside Ray."""
    try:
        from ray.util.metrics import Gauge

        return Gauge(name, description=description, tag_keys=("run",))
    except Exception:  # noqa: BLE001 - metrics are best effort
        return None


# ----------------------------------------------------------------------------- matrix bookkeeping


def policy_name(stage: int, prefix: str = "tso") -> str:
    return f"{prefix}-{stage}"


def register_policy(cfg: RunConfig, stage: int, policy_dir: str, prefix: str = "tso") -> RunConfig:
    """The stage's policy joins the matrix as the newest version of the base's size and becomes the
    base of the next stage; the old base becomes a negative source (docs/method.md section 6).

    Every other model keeps the role it had, so the mixtures change only by the demoted base. With
    explicit negative weights (``weight`` on the matrix models) the demoted base takes an equal share,
    1/(n+1) for n earlier negatives, and the others keep their proportions (scaled by n/(n+1)); an
    explicit ``pairs.negative_sources`` list gets it appended. Positive weights are unchanged."""
    mix = cfg.mixtures()
    new = cfg.model_copy(deep=True)
    base = new.matrix.entry(new.matrix.base)
    for m in new.matrix.models:
        if m.name != base.name:
            m.role = "positive" if m.name in mix.alpha else "negative" if m.name in mix.gamma else "none"
    negatives = [m for m in new.matrix.models if m.role == "negative"]
    if any(m.weight is not None for m in negatives):
        n = len(negatives)
        for m in negatives:
            m.weight = m.weight * n / (n + 1)
        base.weight = 1.0 / (n + 1)
    base.role = "negative"
    if new.pairs.negative_sources is not None:
        new.pairs.negative_sources = [*new.pairs.negative_sources, base.name]
    entry = ModelEntry(
        name=policy_name(stage, prefix), path=str(policy_dir),
        version=max(m.version for m in new.matrix.models if m.size == base.size) + 1,
        size=base.size, engine=base.engine.model_copy(), resources=base.resources.model_copy(),
        **derived_options(base),
    )
    new.matrix.models.append(entry)
    new.matrix.base = entry.name
    return RunConfig.model_validate(new.model_dump())  # re-check the mixtures of the new matrix


# ----------------------------------------------------------------------------- the steps


JUDGE_KINDS = {
    "configured": "the configured judge.path,",
    "corrected": "the base model fine-tuned on judge.feedback at stage 0, by evaluation correction,",
    "uncorrected": "the base model itself, not corrected (no judge.feedback and no judge.path),",
}


def judge_phase(cfg: RunConfig, run_dir: Path, timer: Timer) -> tuple[str, str]:
    """Stage 0: the judge, as (path, kind). A configured judge.path is used as is; without one the
    base model is fine-tuned on judge.feedback, or serves uncorrected when there is no feedback."""
    if cfg.judge.path:
        return cfg.judge.path, "configured"
    base = cfg.matrix.entry(cfg.matrix.base).path
    judge = judge_dir(run_dir)
    if judge_done(judge, run_dir / "judge_train"):
        print(f"[tso] judge: done before ({judge})")
        return str(judge), "corrected"
    if not cfg.judge.feedback:
        print(f"[tso] judge: no judge.feedback and no judge.path: the base model ({base}) is the uncorrected judge")
        return base, "uncorrected"
    from tso.train.ray_trainer import train_judge

    timer.run("judge correction (stage 0)", train_judge, cfg, cfg.judge.feedback, judge)
    return str(judge), "corrected"


def judge_quality_phase(cfg: RunConfig, run_dir: Path, timer: Timer, kind: str) -> dict | None:
    """The settled judge, the uncorrected base and a length-only predictor on ``judge.held_out``, once
    per run (``judge_quality.json``; a corrected judge's ``judge_train/summary.json`` holds it too)."""
    if not cfg.judge.held_out:
        print("[tso] judge quality: not measured (set judge.held_out to a held-out feedback file)")
        return None
    from tso.models.checkpoint import checkpoint_options
    from tso.run.judge_quality import measure_judge

    if not Path(cfg.judge.held_out).is_file():
        raise FileNotFoundError(f"judge.held_out: {cfg.judge.held_out}: no such file")
    out = run_dir / "judge_quality.json"
    done = read_json_marker(out, ("judge", "base", "length_only", "rule"))
    base = cfg.matrix.entry(cfg.matrix.base)
    if done is not None and done.get("judge_path") == str(cfg.judge.path) and done.get("held_out") == cfg.judge.held_out:
        quality = done
        print(f"[tso] judge quality: measured before ({out})")
    else:
        quality = timer.run("judge quality on held-out feedback", _measure_on_cluster, cfg, measure_judge,
                            cfg.judge.path, base.path, cfg.judge.held_out, max_records=cfg.judge.held_out_max,
                            max_new_tokens=cfg.judge.sampling.max_new_tokens,
                            judge_options=checkpoint_options(cfg.judge), base_options=checkpoint_options(base),
                            same_model=kind == "uncorrected", engine_config=cfg.judge.engine)
        atomic_write_json(out, quality)
    summary_path = run_dir / "judge_train" / "summary.json"
    summary = read_json_marker(summary_path)
    if kind == "corrected" and summary is not None and summary.get("quality", {}).get("judge") != quality["judge"]:
        summary["quality"] = {k: quality[k] for k in ("held_out", "records", "judge", "base", "length_only", "rule")}
        atomic_write_json(summary_path, summary)
    print(f"[tso] judge quality ({quality['records']} held-out records): {quality_line(quality)}")
    return quality


def _measure_on_cluster(cfg: RunConfig, fn, *args, **kwargs):
    """Run ``fn`` as a Ray task with the judge deployment's CPUs and GPUs (at least one CPU), so a
    real judge is measured where it can run, not in the job's driver process."""
    import ray

    res = cfg.judge.resources
    task = ray.remote(num_cpus=max(1.0, res.num_cpus), num_gpus=res.num_gpus, max_retries=1)(fn)
    return ray.get(task.remote(*args, **kwargs))


def quality_line(q: dict) -> str:
    def one(r: dict) -> str:
        rho = "-" if r.get("spearman") is None else f"{r['spearman']:.2f}"
        return f"parsed {r['parse_rate']:.0%}, Spearman {rho}"

    floor = q["length_only"]["spearman"]
    verdict = "holds" if q["rule"]["holds"] else "fails: " + ", ".join(k for k, ok in q["rule"]["checks"].items() if not ok)
    return (f"judge {one(q['judge'])}; uncorrected base {one(q['base'])}; length-only Spearman "
            f"{'-' if floor is None else f'{floor:.2f}'}; rule (>= 95% parsed, Spearman >= 0.5, beats length) {verdict}")


def settle_judge(cfg: RunConfig, path: str, kind: str) -> None:
    """Pin the judge for every stage: it is trained (or chosen) once, while the base moves each stage.
    A judge made from the base keeps the base's loading options where the judge sets none."""
    if kind != "configured":
        base = checkpoint_options(cfg.matrix.entry(cfg.matrix.base))
        for key in OPTION_KEYS:
            if getattr(cfg.judge, key) in (None, False):
                setattr(cfg.judge, key, base[key] if kind == "uncorrected" or key != "revision" else None)
    cfg.judge.path = path


def pairs_phase(cfg: RunConfig, stage: int, out_dir: Path, timer: Timer) -> Path:
    summary = out_dir / "summary.json"
    if pairs_done(out_dir):
        print(f"[tso] stage {stage} pairs: done before ({out_dir})")
        return out_dir / "pairs.parquet"
    from tso.pairs.pipeline import form_pairs_step

    res = timer.run(f"stage {stage}: pair formation", form_pairs_step, cfg, stage, out_dir, app_name=cfg.serve.app_name)
    s = res["summary"]
    print(f"[tso] stage {stage}: {s['pairs']} pairs from {s['prompts']} prompts, kinds {s['pair_kinds']}, "
          f"rejected rows {s['rejected_rows']}, unscored judge answers {s['unscored_judge_answers']}")
    if s["pairs"] == 0:
        raise RuntimeError(f"stage {stage}: pair formation made no pairs (see {summary})")
    return out_dir / "pairs.parquet"


def training_phase(cfg: RunConfig, stage: int, pairs: Path, base_path: str, out_dir: Path, timer: Timer) -> str:
    policy = out_dir / "policy"
    if training_done(out_dir):
        print(f"[tso] stage {stage} training: done before ({policy})")
        return str(policy)
    from tso.train.ray_trainer import train_policy

    res = timer.run(f"stage {stage}: mini-batch iterative DPO", train_policy, cfg, pairs, base_path, out_dir, stage)
    return res.policy_dir


def run_stages(
    cfg: RunConfig, run_dir: Path, timer: Timer, prefix: str = "tso", deploy_app: bool = True, serve_last: bool = True
) -> tuple[RunConfig, list[str]]:
    """Stages 1..T over a config whose judge is settled; returns the final config and the policies."""
    from tso.serving.app import deploy, require_served
    from tso.serving.client import POLICY

    stage_gauge = _metric("tso_stage", "the TSO stage being run")
    if deploy_app:
        timer.run("deploy matrix, policy and judge on Serve", deploy, cfg)
    policies = []
    for t in range(1, cfg.stages + 1):
        if stage_gauge:
            stage_gauge.set(t, tags={"run": cfg.name})
        pairs = pairs_phase(cfg, t, pairs_dir(run_dir, t), timer)
        base_path = cfg.matrix.entry(cfg.matrix.base).path
        policy = training_phase(cfg, t, pairs, base_path, train_dir(run_dir, t), timer)
        policies.append(policy)
        cfg = register_policy(cfg, t, policy, prefix)
        if t < cfg.stages or serve_last:
            # the new version gets its own deployment and the policy deployment now serves it
            timer.run(f"stage {t}: register {cfg.matrix.base} and hot-swap the policy", deploy, cfg)
            require_served(cfg, {POLICY: cfg.matrix.entry(cfg.matrix.base).path})
    return cfg, policies


def baseline_config(ref: str, main: RunConfig, run_dir: Path) -> RunConfig:
    """A baseline is the main run's config (its matrix, prompts, seed, judge and ``--set`` overrides)
    with only the method keys of the baseline's config file applied (``tso.config.method_overrides``)."""
    name, overrides = method_overrides(ref)
    data = deep_merge(main.model_dump(mode="json"), overrides)
    data.update(name=name, run_dir=str(baseline_run_dir(run_dir, name)), baselines=[])
    data["serve"]["app_name"] = f"{main.settle_app_name('run')}-{name}"[:64]  # its own app, never the run's
    return parse_config(data, str(resolve_config_ref(ref)))


def check_run_dir(run_dir: Path, config_hash: str) -> None:
    """Refuse a run directory that holds a run of another config, before anything in it is written."""
    previous = run_dir / "run.json"
    if not previous.exists():
        return
    old = read_json_marker(previous)
    if old is None:
        raise RuntimeError(f"{previous} is unreadable, so which config {run_dir} holds cannot be told: use a new "
                           "run_dir, or delete run.json to resume this one with this config")
    if old.get("config_hash") not in (None, config_hash):
        raise RuntimeError(
            f"{run_dir} holds a run of another config (hash {old['config_hash']} != {config_hash}): "
            "use a new run_dir or restore the config"
        )


def run_pipeline(
    cfg: RunConfig, source: str = "<config>", *, with_baselines: bool = True, keep_serving: bool | None = None
) -> dict:
    """The whole run, holding the run directory's lock (one process writes a run directory at a time)."""
    with run_dir_lock(cfg.run_dir, f"tso run {source}"):
        return _run_pipeline(cfg, source, with_baselines=with_baselines, keep_serving=keep_serving)


def _run_pipeline(cfg: RunConfig, source: str, *, with_baselines: bool, keep_serving: bool | None) -> dict:
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir, cfg.config_hash())  # first: a refused run_dir keeps every file as it was
    timer = Timer()
    app = cfg.settle_app_name("run")
    apps = [app]  # the Serve apps this run deploys: the only ones it deletes
    from tso.models.preflight import check_models

    check_models(cfg, source)  # every checkpoint, template and stop token, before anything starts
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    meta = {"name": cfg.name, "config_hash": cfg.config_hash(), "seed": cfg.seed, "stages": cfg.stages,
            "loss": cfg.train.loss.type, "source": source, "status": "running", "started": time.time()}
    previous = run_dir / "run.json"
    atomic_write_json(previous, meta)

    started_ray = connect_ray()
    try:
        judge_path, judge_kind = judge_phase(cfg, run_dir, timer)
        settle_judge(cfg, judge_path, judge_kind)
        quality = judge_quality_phase(cfg, run_dir, timer, judge_kind)
        meta["judge"] = {"kind": judge_kind, "path": judge_path, "feedback": cfg.judge.feedback,
                         "description": JUDGE_KINDS[judge_kind],
                         "quality": None if quality is None else {"records": quality["records"],
                                                                  "holds": quality["rule"]["holds"]}}
        atomic_write_json(previous, meta)
        final_cfg, policies = run_stages(cfg, run_dir, timer)

        models = {"base": cfg.matrix.entry(cfg.matrix.base).path}
        models.update({policy_name(t + 1): p for t, p in enumerate(policies)})
        if with_baselines and cfg.baselines:
            from tso.serving.app import delete_app, deploy

            delete_app(app)  # its replicas make room for each baseline's app, then it comes back for evaluation
            for ref in cfg.baselines:
                bcfg = baseline_config(ref, cfg, run_dir)
                Path(bcfg.run_dir).mkdir(parents=True, exist_ok=True)
                apps.append(bcfg.serve.app_name)
                _, bpolicies = run_stages(bcfg, Path(bcfg.run_dir), timer.scoped(f"baseline {bcfg.name}: "),
                                          prefix=bcfg.name, serve_last=False)
                models[bcfg.name] = bpolicies[-1]
                delete_app(bcfg.serve.app_name)
            timer.run("restore the TSO app", deploy, final_cfg)

        if cfg.eval.prompts:
            from tso.run.evaluate import evaluate
            from tso.serving.client import ServeClient

            timer.run("evaluation", evaluate, cfg, models, eval_dir(run_dir), ServeClient.from_config(cfg))
        meta.update(status="done", timings=timer.phases, finished=time.time(), policies=policies,
                    verifier=cfg.eval.verifier)
        atomic_write_json(previous, meta)
        from tso.run.report import write_report

        report = write_report(run_dir)
        print(f"[tso] report: {report}")
        return {"run_dir": str(run_dir), "report": str(report), "policies": policies, "timings": timer.phases}
    finally:
        if keep_serving is False or (keep_serving is None and started_ray):
            import ray

            from tso.serving.app import delete_app

            try:  # its own apps only: serve.shutdown() would stop every other app on a shared cluster
                for name in apps:
                    delete_app(name)
            finally:
                if started_ray:
                    ray.shutdown()
