"""The pair-formation step: prompts -> (Ray Data) -> Serve deployments -> preference pairs.

Per prompt (TSO-METHOD.md sections 1-3): draw positive sources from alpha and negative sources from
gamma, generate their answers, judge them; for prompts drawn for a self pair, sample the policy
n_self times and judge each; then `tso.method.pairing.form_pairs` makes the pairs. Every random
choice is keyed by (seed, stage, prompt id, role), so the same inputs give the same pairs whatever
the batching, replica count or row order.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tso.method.pairing import Candidate, PairRules, form_pairs, tries_self_pair
from tso.method.sources import HUMAN, Mixtures, draw_source, row_rng, row_seed
from tso.pairs.backends import POLICY, Backend
from tso.pairs.prompts import as_chat

SCORE_BINS = [2, 3, 4, 5, 6, 7, 8, 9, 10]


@dataclass(frozen=True)
class PairJob:
    """Everything a worker needs to turn prompt rows into pairs (plain data, so it ships to Ray)."""

    mixtures: Mixtures
    rules: PairRules
    n_pos: int
    n_neg: int
    n_self: int
    sampling: dict  # temperature, top_p, max_new_tokens
    stage: int
    seed: int

    @classmethod
    def from_config(cls, cfg, stage: int) -> PairJob:
        p = cfg.pairs
        return cls(
            mixtures=cfg.mixtures(),
            rules=PairRules.from_config(p),
            n_pos=p.n_pos,
            n_neg=p.n_neg,
            n_self=p.n_self,
            sampling=p.sampling.model_dump(),
            stage=stage,
            seed=cfg.seed,
        )


def _plan_row(job: PairJob, row: dict) -> dict:
    """The keyed draws of one prompt: which sources answer, with which seeds."""
    pid, stage, seed = row["id"], job.stage, job.seed
    if job.rules.mode == "self_reward":  # no matrix answers: the policy's own samples only
        return {"pos": [], "neg": [], "try_self": True, "renorm": False, "self_seed": row_seed(seed, stage, pid, "self")}
    available = set(job.mixtures.alpha) - ({HUMAN} if row.get("human") is None else set())
    pos, neg, renorm = [], [], False
    rng = row_rng(seed, stage, pid, "pos")
    for k in range(job.n_pos):
        src, r = draw_source(job.mixtures.alpha, rng, available)
        renorm |= r
        pos.append((src, row_seed(seed, stage, pid, f"pos{k}")))
    rng = row_rng(seed, stage, pid, "neg")
    for k in range(job.n_neg):
        src, _ = draw_source(job.mixtures.gamma, rng)
        neg.append((src, row_seed(seed, stage, pid, f"neg{k}")))
    try_self = job.n_self > 0 and tries_self_pair(seed, stage, pid, job.rules.self_pair_fraction)
    return {"pos": pos, "neg": neg, "try_self": try_self, "renorm": renorm, "self_seed": row_seed(seed, stage, pid, "self")}


def form_batch(job: PairJob, rows: list[dict], backend: Backend) -> list[dict]:
    """Pairs and per-prompt statistics for a batch of prompt rows; all requests of the batch go out at once."""
    plans = [_plan_row(job, r) for r in rows]
    gen_requests: list[tuple[str, dict]] = []
    slots: list[tuple[int, str, int]] = []  # (row index, kind "pos"/"neg"/"self", position)
    for i, (row, plan) in enumerate(zip(rows, plans)):
        for kind in ("pos", "neg"):
            for k, (src, s) in enumerate(plan[kind]):
                if src != HUMAN:
                    gen_requests.append((src, {"prompt": as_chat(row["prompt"]), "n": 1, "seed": s, **job.sampling}))
                    slots.append((i, kind, k))
        if plan["try_self"]:
            req = {"prompt": as_chat(row["prompt"]), "n": job.n_self, "seed": plan["self_seed"], **job.sampling}
            gen_requests.append((POLICY, req))
            slots.append((i, "self", 0))
    generated = backend.generate(gen_requests) if gen_requests else []

    texts: dict[tuple[int, str, int], list[str]] = {}
    for slot, result in zip(slots, generated):
        texts[slot] = list(result["texts"])
    candidates: list[dict[str, list[tuple[str, str]]]] = []  # per row: kind -> [(source, text)]
    for i, (row, plan) in enumerate(zip(rows, plans)):
        c = {"pos": [], "neg": [], "self": []}
        for kind in ("pos", "neg"):
            for k, (src, _) in enumerate(plan[kind]):
                c[kind].append((src, row["human"] if src == HUMAN else texts[(i, kind, k)][0]))
        if plan["try_self"]:
            c["self"] = [(POLICY, t) for t in texts[(i, "self", 0)]]
        candidates.append(c)

    score_requests, score_slots = [], []
    for i, (row, c) in enumerate(zip(rows, candidates)):
        for kind in ("pos", "neg", "self"):
            for k, (_, text) in enumerate(c[kind]):
                score_requests.append({"prompt": row["prompt"], "response": text})
                score_slots.append((i, kind, k))
    verdicts = dict(zip(score_slots, backend.score(score_requests) if score_requests else []))

    out = []
    for i, (row, plan, c) in enumerate(zip(rows, plans, candidates)):
        judged = {
            kind: [
                Candidate(text, src, verdicts[(i, kind, k)].get("score"), verdicts[(i, kind, k)].get("reason"))
                for k, (src, text) in enumerate(c[kind])
            ]
            for kind in c
        }
        pairs, counts = form_pairs(
            row["id"], row["prompt"], judged["pos"], judged["neg"], judged["self"], job.rules,
            stage=job.stage, seed=job.seed, try_self=plan["try_self"], alpha_renormalized=plan["renorm"],
        )
        all_judged = [cand for kind in judged.values() for cand in kind]
        out.append(
            {
                "id": row["id"],
                "pairs": [p.to_row() for p in pairs],
                "counts": counts,
                "sources": {"pos": [s for s, _ in c["pos"]], "neg": [s for s, _ in c["neg"]]},
                "scores": {kind: [x.score for x in judged[kind]] for kind in judged},
                "unscored": [x.unscored_reason or "unscored" for x in all_judged if x.score is None],
            }
        )
    return out


class _RayPairFormer:
    """Ray Data map_batches UDF: one ServeBackend per actor, reused across batches."""

    def __init__(self, job: PairJob, app_name: str):
        from tso.pairs.backends import ServeBackend

        self.job, self.backend = job, ServeBackend(app_name)

    def __call__(self, batch: dict) -> dict:
        rows = [
            {"id": i, "prompt": json.loads(p), "human": h}
            for i, p, h in zip(batch["id"], batch["prompt_json"], batch["human"])
        ]
        results = form_batch(self.job, rows, self.backend)
        return {"id": [r["id"] for r in results], "result_json": [json.dumps(r) for r in results]}


def _to_dataset_rows(rows: list[dict]) -> list[dict]:
    # Chats are lists of dicts: JSON-encode prompts so Arrow sees one column type.
    return [{"id": r["id"], "prompt_json": json.dumps(r["prompt"]), "human": r.get("human")} for r in rows]


def run_with_ray_data(job: PairJob, rows: list[dict], app_name: str, batch_size: int = 16, concurrency: int = 2):
    """Stream prompt rows through the Serve deployments with Ray Data; yields per-prompt results."""
    import ray

    ds = ray.data.from_items(_to_dataset_rows(rows), override_num_blocks=max(1, min(len(rows) // batch_size, 64)))
    ds = ds.map_batches(
        _RayPairFormer,
        fn_constructor_kwargs={"job": job, "app_name": app_name},
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=0.1,
    )
    for item in ds.iter_rows():
        yield json.loads(item["result_json"])


def run_local(job: PairJob, rows: list[dict], backend: Backend, batch_size: int = 16):
    for start in range(0, len(rows), batch_size):
        yield from form_batch(job, rows[start : start + batch_size], backend)


def summarize(results: list[dict], rejects: list[dict], over_limit: int, seconds: float) -> dict:
    counts: Counter = Counter()
    chosen_src: Counter = Counter()
    rejected_src: Counter = Counter()
    drawn_pos: Counter = Counter()
    drawn_neg: Counter = Counter()
    unscored: Counter = Counter()
    hist = {k: Counter() for k in ("pos", "neg", "self", "chosen", "rejected")}
    n_pairs = 0
    for r in results:
        counts.update(r["counts"])
        drawn_pos.update(r["sources"]["pos"])
        drawn_neg.update(r["sources"]["neg"])
        unscored.update(r["unscored"])
        for kind in ("pos", "neg", "self"):
            hist[kind].update(_bin(s) for s in r["scores"][kind])
        for p in r["pairs"]:
            n_pairs += 1
            chosen_src[p["chosen_source"]] += 1
            rejected_src[p["rejected_source"]] += 1
            hist["chosen"][_bin(p["chosen_score"])] += 1
            hist["rejected"][_bin(p["rejected_score"])] += 1
    return {
        "prompts": len(results),
        "pairs": n_pairs,
        "pair_kinds": dict(counts),
        "drawn_sources": {"positive": dict(drawn_pos), "negative": dict(drawn_neg)},
        "pair_sources": {"chosen": dict(chosen_src), "rejected": dict(rejected_src)},
        "score_histograms": {k: dict(sorted(v.items())) for k, v in hist.items()},
        "unscored_judge_answers": dict(unscored),
        "rejects": dict(Counter(r["reason"] for r in rejects)),
        "rejected_rows": len(rejects),
        "over_max_prompts": over_limit,
        "seconds": round(seconds, 3),
        "pairs_per_second": round(n_pairs / seconds, 3) if seconds > 0 else None,
    }


def _bin(score: float | None) -> str:
    if score is None:
        return "unscored"
    return str(max(2, min(9, int(score))))  # [2,3), ..., [9,10]


def write_outputs(out_dir: Path, results: list[dict], summary: dict, rejects: list[dict]) -> dict[str, Path]:
    import pyarrow as pa

    from tso.io import atomic_write_json, atomic_write_parquet
    from tso.pairs.prompts import prompt_text, write_rejects

    rows = [p for r in sorted(results, key=lambda r: r["id"]) for p in r["pairs"]]
    for p in rows:  # `prompt` is flat text for reading; `prompt_messages` is the chat the models saw
        chat = p["prompt"] if isinstance(p["prompt"], list) else [{"role": "user", "content": p["prompt"]}]
        p["prompt_messages"] = json.dumps(chat, ensure_ascii=False)
        p["prompt"] = prompt_text(p["prompt"])
    schema = pa.schema(
        [
            ("id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
            ("chosen_source", pa.string()), ("rejected_source", pa.string()),
            ("chosen_score", pa.float64()), ("rejected_score", pa.float64()), ("kind", pa.string()),
            ("stage", pa.int64()), ("seed", pa.int64()), ("alpha_renormalized", pa.bool_()),
            ("self_scores", pa.list_(pa.float64())), ("prompt_messages", pa.string()),
        ]
    )
    paths = {
        "pairs": atomic_write_parquet(out_dir / "pairs.parquet", rows, schema=schema),
        "rejects": out_dir / "rejects.jsonl",
    }
    write_rejects(rejects, paths["rejects"])
    paths["summary"] = atomic_write_json(out_dir / "summary.json", summary)  # written last: marks the step done
    return paths


def form_pairs_step(cfg, stage: int, out_dir: str | Path, *, app_name: str | None = None, backend: Backend | None = None,
                    batch_size: int = 16, concurrency: int = 2, progress: bool = True) -> dict:
    """Read cfg.pairs.prompts, form pairs through Serve (or `backend`), write pairs/summary/rejects."""
    from tqdm import tqdm

    from tso.pairs.prompts import read_prompts

    if not cfg.pairs.prompts:
        raise ValueError("pairs.prompts is not set: give a prompts JSONL/Parquet file")
    out_dir = Path(out_dir)
    prompts = read_prompts(cfg.pairs.prompts, cfg.pairs.max_prompt_chars, cfg.pairs.max_prompts)
    job = PairJob.from_config(cfg, stage)
    start = time.perf_counter()
    if backend is None:
        stream = run_with_ray_data(job, prompts.rows, app_name or cfg.serve.app_name, batch_size, concurrency)
    else:
        stream = run_local(job, prompts.rows, backend, batch_size)
    results = list(tqdm(stream, total=len(prompts.rows), desc=f"pairs stage {stage}", unit="prompt", disable=not progress))
    summary = summarize(results, prompts.rejects, prompts.over_limit, time.perf_counter() - start)
    summary.update({"stage": stage, "seed": cfg.seed, "prompts_file": cfg.pairs.prompts})
    paths = write_outputs(out_dir, results, summary, prompts.rejects)
    return {"summary": summary, **{f"{k}_path": str(v) for k, v in paths.items()}}
