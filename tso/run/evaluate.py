"""Held-out evaluation: each model answers the evaluation prompts with the paper's decoding settings;
the judge (a Serve deployment) scores every answer and, when a verifier is configured, it gives the
ground truth; win rates are taken per prompt against the base model's answer to the same prompt
(on the verifier when there is one, else on the judge's scores: then it says so)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tso.io import atomic_write_json, atomic_write_text
from tso.method.sources import row_seed


def _generate_answers(engine_cfg: dict, path: str, rows: list[dict], sampling: dict, seed: int,
                      options: dict | None = None) -> list[dict]:
    """Runs where Ray places it (a task with the model's resources): load once, generate in batches.
    One answer per row: {"text", "finish_reason"} or {"error"} for a prompt the model cannot take."""
    from tso.config import EngineConfig
    from tso.engines.factory import make_engine
    from tso.engines.requests import generate_requests
    from tso.pairs.prompts import as_chat

    engine = make_engine(EngineConfig.model_validate(engine_cfg), path, options)
    requests = [{"prompt": as_chat(r["prompt"]), "n": 1, "seed": row_seed(seed, 0, r["id"], "eval"), **sampling}
                for r in rows]
    out: list[dict] = []
    # an offline job: batch at least 64 (answers do not depend on their batch companions)
    step = max(64, engine_cfg.get("max_batch_size", 16))
    try:
        for i in range(0, len(requests), step):
            for res in generate_requests(engine, requests[i : i + step], return_exceptions=True):
                if isinstance(res, Exception):
                    out.append({"error": str(res)})
                else:
                    out.append({"text": res["texts"][0], "finish_reason": res["finish_reasons"][0]})
    finally:
        if hasattr(engine, "shutdown"):  # vLLM's engine process must not outlive the task (Ray reuses workers)
            engine.shutdown()
    return out


def evaluate_model(cfg, label: str, path: str, rows: list[dict], out_dir: Path, client) -> dict:
    """Answers and scores of one model, written to <out_dir>/<label>.answers.jsonl (resumable per model)."""
    import ray

    from tso.models.checkpoint import checkpoint_options
    from tso.run.verifiers import ground_truth, load_verifier

    answers_path = out_dir / f"{label}.answers.jsonl"
    if answers_path.is_file():
        records = [json.loads(line) for line in answers_path.read_text().splitlines() if line.strip()]
        if records and records[0].get("path") == path and len(records) == len(rows):
            return {"label": label, "records": records, "resumed": True}
    base = cfg.matrix.entry(cfg.matrix.base)
    sampling = cfg.eval.sampling.model_dump()
    remote = ray.remote(_generate_answers).options(
        num_cpus=max(base.resources.num_cpus, 0.1), num_gpus=base.resources.num_gpus
    )
    answers = ray.get(remote.remote(base.engine.model_dump(), path, rows, sampling, cfg.seed, checkpoint_options(base)))
    answered = [(r, a) for r, a in zip(rows, answers) if "text" in a]
    verdicts = iter(client.score([{"prompt": r["prompt"], "response": a["text"]} for r, a in answered]))
    verifier = load_verifier(cfg.eval.verifier)
    records = []
    for r, a in zip(rows, answers):
        record = {"label": label, "path": path, "id": r["id"], "family": (r.get("metadata") or {}).get("family"),
                  "answer": a.get("text"), "finish_reason": a.get("finish_reason"), "error": a.get("error"),
                  "judge": None, "judge_reason": None, "verifier": None, "verifier_dimensions": None}
        if "text" in a:
            v = next(verdicts)
            error = v.get("error")
            record.update(judge=v.get("score"), judge_reason=v.get("reason") or (error and f"judge_error:{error['code']}"))
            if verifier is not None:
                record["verifier"], record["verifier_dimensions"] = ground_truth(verifier, r, a["text"])
        records.append(record)
    atomic_write_text(answers_path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records))
    return {"label": label, "records": records, "resumed": False}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _stderr(xs):
    """Standard error of the mean: sampled answers make every mean noisy, so tables show how much."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5


def summarize_model(records: list[dict], base_records: list[dict] | None, verifier: bool | None = None) -> dict:
    if verifier is None:
        verifier = any(r.get("verifier") is not None for r in records)
    key = "verifier" if verifier else "judge"
    answered = [r for r in records if r.get("answer") is not None]
    out = {
        "n": len(records),
        "answered": len(answered),
        "failed": len(records) - len(answered),
        "truncated": sum(r.get("finish_reason") == "length" for r in answered),
        "truncation_rate": (sum(r.get("finish_reason") == "length" for r in answered) / len(answered)
                            if answered else None),
        "verifier": verifier,
        "verifier_mean": _mean(r.get("verifier") for r in records) if verifier else None,
        "verifier_se": _stderr([r.get("verifier") for r in records]) if verifier else None,
        "judge_mean": _mean(r["judge"] for r in records),
        "judge_se": _stderr([r["judge"] for r in records]),
        "judge_unscored": sum(r["judge"] is None for r in answered),
        "judge_parse_rate": (sum(r["judge"] is not None for r in answered) / len(answered)) if answered else None,
        "judge_unscored_reasons": dict(sorted(_count(r.get("judge_reason") or "unscored" for r in answered
                                                     if r["judge"] is None).items())),
        "win_rate_key": key,
    }
    fam = defaultdict(list)
    for r in records:
        if r.get("family") and r["verifier"] is not None:
            fam[r["family"]].append(r["verifier"])
    out["per_family"] = {f: sum(v) / len(v) for f, v in sorted(fam.items())}
    dims = defaultdict(list)
    for r in records:
        for d, v in (r.get("verifier_dimensions") or {}).items():
            dims[d].append(v)
    out["verifier_dimensions"] = {d: sum(v) / len(v) for d, v in dims.items()}
    if base_records is not None:
        base_by_id = {r["id"]: r[key] for r in base_records}
        wins = []
        for r in records:
            b, s = base_by_id.get(r["id"]), r[key]
            if b is None or s is None:
                continue
            wins.append(1.0 if s > b else 0.5 if s == b else 0.0)
        out["win_rate_vs_base"] = sum(wins) / len(wins) if wins else None
        out["win_rate_prompts"] = len(wins)
    return out


def _count(items) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for x in items:
        out[x] += 1
    return out


def read_eval_rows(cfg, out_dir: Path | None = None) -> list[dict]:
    """Held-out rows; a bad row is left out with its line and reason (``<out_dir>/rejects.jsonl``)."""
    from tso.pairs.prompts import read_prompts, write_rejects

    if not cfg.eval.prompts:
        raise ValueError("eval.prompts is not set: give a held-out prompts JSONL")
    ps = read_prompts(cfg.eval.prompts, cfg.pairs.max_prompt_chars, cfg.eval.max_prompts)
    if ps.rejects:
        print(f"[eval] {len(ps.rejects)} evaluation rows rejected: {ps.reject_counts}")
        if out_dir is not None:
            write_rejects(ps.rejects, out_dir / "rejects.jsonl")
    return ps.rows


def evaluate(cfg, models: dict[str, str], out_dir: str | Path, client) -> list[dict]:
    """Evaluate {label: model dir}; "base" must be among them for win rates. Writes <label>.json each."""
    out_dir = Path(out_dir)
    rows = read_eval_rows(cfg, out_dir)
    results = {}
    for label, path in models.items():
        res = evaluate_model(cfg, label, path, rows, out_dir, client)
        print(f"[eval] {label}: {len(res['records'])} answers{' (resumed)' if res['resumed'] else ''}")
        results[label] = res["records"]
    base = results.get("base")
    verifier = cfg.eval.verifier != "none"
    summaries = []
    for label, records in results.items():
        s = {"label": label, "path": models[label],
             **summarize_model(records, base if label != "base" else None, verifier)}
        atomic_write_json(out_dir / f"{label}.json", s)
        summaries.append(s)
    return summaries
