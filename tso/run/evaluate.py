"""Held-out evaluation: each model answers the evaluation prompts with the paper's decoding settings;
the judge (a Serve deployment) scores every answer and, in the toy world, the verifier gives the
ground truth; win rates are taken against the base model's answers to the same prompts."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tso.io import atomic_write_json, atomic_write_text
from tso.method.sources import row_seed


def _generate_answers(engine_cfg: dict, path: str, rows: list[dict], sampling: dict, seed: int) -> list[str]:
    """Runs where Ray places it (a task with the model's resources): load once, generate in batches."""
    from tso.config import EngineConfig
    from tso.engines.base import make_engine
    from tso.engines.requests import generate_requests

    engine = make_engine(EngineConfig.model_validate(engine_cfg), path)
    from tso.pairs.prompts import as_chat

    requests = [{"prompt": as_chat(r["prompt"]), "n": 1, "seed": row_seed(seed, 0, r["id"], "eval"), **sampling}
                for r in rows]
    out: list[str] = []
    # an offline job: batch at least 64 (answers do not depend on their batch companions)
    step = max(64, engine_cfg.get("max_batch_size", 16))
    for i in range(0, len(requests), step):
        out += [res["texts"][0] for res in generate_requests(engine, requests[i : i + step])]
    return out


def _ground_truth(kind: str):
    """(row, answer) -> (overall score, {dimension: score}), or None without a verifier."""
    if kind == "toyworld":
        from tso.toyworld.tasks import task_from_row
        from tso.toyworld.verifier import overall, verify_dimensions

        def truth(row: dict, answer: str) -> tuple[float, dict[str, float]]:
            dims = verify_dimensions(task_from_row({"prompt": row["prompt"], **row.get("metadata", {})}), answer)
            return overall(dims), dims

        return truth
    return None


def evaluate_model(cfg, label: str, path: str, rows: list[dict], out_dir: Path, backend) -> dict:
    """Answers and scores of one model, written to <out_dir>/<label>.answers.jsonl (resumable per model)."""
    import ray

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
    answers = ray.get(remote.remote(base.engine.model_dump(), path, rows, sampling, cfg.seed))
    verdicts = backend.score([{"prompt": r["prompt"], "response": a} for r, a in zip(rows, answers)])
    truth = _ground_truth(cfg.eval.verifier)
    records = []
    for r, a, v in zip(rows, answers, verdicts):
        score, dims = truth(r, a) if truth else (None, None)
        records.append(
            {
                "label": label, "path": path, "id": r["id"], "family": (r.get("metadata") or {}).get("family"),
                "answer": a, "judge": v.get("score"), "judge_reason": v.get("reason"),
                "verifier": score, "verifier_dimensions": dims,
            }
        )
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


def summarize_model(records: list[dict], base_records: list[dict] | None) -> dict:
    key = "verifier" if any(r["verifier"] is not None for r in records) else "judge"
    out = {
        "n": len(records),
        "verifier_mean": _mean(r["verifier"] for r in records),
        "verifier_se": _stderr([r["verifier"] for r in records]),
        "judge_mean": _mean(r["judge"] for r in records),
        "judge_se": _stderr([r["judge"] for r in records]),
        "judge_unscored": sum(r["judge"] is None for r in records),
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
    return out


def read_eval_rows(cfg) -> list[dict]:
    from tso.pairs.prompts import read_prompts

    if not cfg.eval.prompts:
        raise ValueError("eval.prompts is not set: give a held-out prompts JSONL")
    ps = read_prompts(cfg.eval.prompts, cfg.pairs.max_prompt_chars, cfg.eval.max_prompts)
    if ps.rejects:
        print(f"[eval] {len(ps.rejects)} evaluation rows rejected: {ps.reject_counts}")
    return ps.rows


def evaluate(cfg, models: dict[str, str], out_dir: str | Path, backend) -> list[dict]:
    """Evaluate {label: model dir}; "base" must be among them for win rates. Writes <label>.json each."""
    out_dir = Path(out_dir)
    rows = read_eval_rows(cfg)
    results = {}
    for label, path in models.items():
        res = evaluate_model(cfg, label, path, rows, out_dir, backend)
        print(f"[eval] {label}: {len(res['records'])} answers{' (resumed)' if res['resumed'] else ''}")
        results[label] = res["records"]
    base = results.get("base")
    summaries = []
    for label, records in results.items():
        s = {"label": label, "path": models[label], **summarize_model(records, base if label != "base" else None)}
        atomic_write_json(out_dir / f"{label}.json", s)
        summaries.append(s)
    return summaries
