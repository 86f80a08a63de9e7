"""The pair-formation step: prompts -> (Ray Data) -> Serve deployments -> preference pairs.

Per prompt (docs/method.md sections 1-3): draw positive sources from alpha and negative sources from
gamma, generate their answers, judge them; for prompts drawn for a self pair, sample the policy
n_self times and judge each; then `tso.method.pairing.form_pairs` makes the pairs. Every random
choice is keyed by (seed, stage, prompt id, role), so the same inputs give the same pairs whatever
the batching, replica count or row order.

Nothing about one row fails the stage. Rows are checked before any model call (``prompts`` for
structure and encoding, ``limits`` for token lengths against each model). An answer cut by
``max_new_tokens`` or the context is *truncated*: with ``pairs.truncated: drop`` (the default) it is
left out and its side is drawn again from the same mixture (a keyed redraw, at most
``pairs.max_redraws`` times), with ``keep`` it is used and trained without an end-of-turn token.
A request that fails inside a deployment (an input error) costs its source for that row: the side
is redrawn from the other sources, and a row left without a pair is a reject naming the source.

Resume: each finished batch's results are journaled under ``<out_dir>/.journal/`` (one file per
batch, written atomically) with a digest of what decides them (the config without its serving
settings, the stage, the prompts file's bytes, the weights each deployment serves). A step started
again with the same digest forms pairs only for the prompts not journaled yet, and its outputs equal
an uninterrupted run's (timings aside); a journal of another digest is removed. The journal is
removed once summary.json is written.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tso.method.pairing import Candidate, PairRules, form_pairs, tries_self_pair
from tso.method.sources import HUMAN, Mixtures, draw_source, row_rng, row_seed
from tso.pairs.prompts import as_chat
from tso.serving.client import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, POLICY, ModelClient

#: counts of form_pairs that are not pair kinds
NO_PAIR_KEYS = ("filtered", "no_positive", "no_negative", "no_self_pair")
SAMPLER_KEYS = ("rso_accepted", "rso_ties")  # what RSO's rejection sampler did (pairs.mode: rso)


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
    truncated: str = "drop"
    max_redraws: int = 2

    @classmethod
    def from_config(cls, cfg, stage: int) -> PairJob:
        p = cfg.pairs
        return cls(
            mixtures=cfg.mixtures(),
            rules=PairRules.from_config(p),
            n_pos=p.n_pos,
            n_neg=p.n_neg,
            n_self=p.rso.samples if p.mode == "rso" else p.n_self,
            sampling=p.sampling.model_dump(),
            stage=stage,
            seed=cfg.seed,
            truncated=p.truncated,
            max_redraws=p.max_redraws,
        )


def _available(job: PairJob, row: dict, side: str, exclude: set[str] = frozenset()) -> set[str]:
    """The sources a row can draw from: weight above 0, not too short a context, no failure yet."""
    weights = job.mixtures.alpha if side == "pos" else job.mixtures.gamma
    gone = set(row.get("unavailable") or ()) | set(exclude) | ({HUMAN} if row.get("human") is None else set())
    return {n for n, w in weights.items() if w > 0 and n not in gone}


def _plan_row(job: PairJob, row: dict) -> dict:
    """The keyed draws of one prompt: which sources answer, with which seeds."""
    pid, stage, seed = row["id"], job.stage, job.seed
    if job.rules.mode in ("self_reward", "rso"):  # no matrix answers: the policy's own samples only
        return {"pos": [], "neg": [], "try_self": True, "renorm": False, "self_seed": row_seed(seed, stage, pid, "self")}
    pos, neg, renorm = [], [], False
    for side, count, out in (("pos", job.n_pos, pos), ("neg", job.n_neg, neg)):
        weights = job.mixtures.alpha if side == "pos" else job.mixtures.gamma
        available = _available(job, row, side)
        rng = row_rng(seed, stage, pid, side)
        for k in range(count):
            src, r = draw_source(weights, rng, available)
            renorm |= r and side == "pos"
            out.append((src, row_seed(seed, stage, pid, f"{side}{k}")))
    try_self = job.n_self > 0 and tries_self_pair(seed, stage, pid, job.rules.self_pair_fraction)
    return {"pos": pos, "neg": neg, "try_self": try_self, "renorm": renorm, "self_seed": row_seed(seed, stage, pid, "self")}


def _redraw(job: PairJob, row: dict, side: str, k: int, attempt: int, exclude: set[str]) -> tuple[str, int] | None:
    """Another keyed draw for a side whose answer was dropped or failed (None: no source left)."""
    available = _available(job, row, side, exclude)
    if not available:
        return None
    role = f"{side}{k}-redraw{attempt}"
    weights = job.mixtures.alpha if side == "pos" else job.mixtures.gamma
    src, _ = draw_source(weights, row_rng(job.seed, job.stage, row["id"], role), available)
    return src, row_seed(job.seed, job.stage, row["id"], role)


@dataclass
class _RowState:
    """What happened to one prompt row while its answers were generated."""

    candidates: dict[str, list[Candidate | None]]
    truncated: list[str] = field(default_factory=list)  # source of every truncated answer
    failed: list[dict] = field(default_factory=list)  # {"source", "code", "message"}
    redrawn: list[tuple[str, str]] = field(default_factory=list)  # (side, source) of every redraw
    excluded: dict[str, set[str]] = field(default_factory=lambda: {"pos": set(), "neg": set()})
    generated_tokens: int = 0  # of every answer generated for the row (redraws and dropped ones included)


def _request(row: dict, job: PairJob, n: int, seed: int) -> dict:
    return {"prompt": as_chat(row["prompt"]), "n": n, "seed": seed, **job.sampling}


def _samples(result: dict, source: str) -> list[Candidate]:
    stops = result.get("stop_tokens") or [None] * len(result["texts"])
    return [Candidate(t, source, finish_reason=f, stop_token=s)
            for t, f, s in zip(result["texts"], result["finish_reasons"], stops)]


def _generate_sides(job: PairJob, rows: list[dict], plans: list[dict], client: ModelClient) -> list[_RowState]:
    """Matrix answers (with keyed redraws of dropped or failed ones) and the policy's own samples."""
    states = [_RowState({"pos": [None] * len(p["pos"]), "neg": [None] * len(p["neg"]), "self": []}) for p in plans]
    pending: list[tuple[int, str, int, str, int]] = []  # (row, side, k, source, seed)
    for i, (row, plan) in enumerate(zip(rows, plans)):
        for side in ("pos", "neg"):
            for k, (src, seed) in enumerate(plan[side]):
                if src == HUMAN:
                    states[i].candidates[side][k] = Candidate(row["human"], HUMAN)
                else:
                    pending.append((i, side, k, src, seed))
    self_rows = [i for i, p in enumerate(plans) if p["try_self"]]
    for attempt in range(job.max_redraws + 1):
        requests = [(src, _request(rows[i], job, 1, seed)) for i, _, _, src, seed in pending]
        if attempt == 0:
            requests += [(POLICY, _request(rows[i], job, job.n_self, plans[i]["self_seed"])) for i in self_rows]
        results = client.generate(requests) if requests else []
        retry = []
        for (i, side, k, src, _), result in zip(pending, results):
            state = states[i]
            if "error" in result:
                state.failed.append({"source": src, **result["error"]})
                state.excluded[side].add(src)
                retry.append((i, side, k))
                continue
            state.generated_tokens += sum(result.get("num_tokens", []))
            cand = _samples(result, src)[0]
            if cand.finish_reason == "length":
                state.truncated.append(src)
                if job.truncated == "drop":
                    retry.append((i, side, k))
                    continue
            state.candidates[side][k] = cand
        if attempt == 0:
            for i, result in zip(self_rows, results[len(pending):]):
                state = states[i]
                if "error" in result:
                    state.failed.append({"source": POLICY, **result["error"]})
                    continue
                state.generated_tokens += sum(result.get("num_tokens", []))
                samples = _samples(result, POLICY)
                state.truncated += [POLICY for c in samples if c.finish_reason == "length"]
                state.candidates["self"] = [c for c in samples if job.truncated == "keep" or c.finish_reason == "stop"]
        pending = []
        if attempt == job.max_redraws:
            break
        for i, side, k in retry:
            drawn = _redraw(job, rows[i], side, k, attempt + 1, states[i].excluded[side])
            if drawn is None:
                continue
            states[i].redrawn.append((side, drawn[0]))
            if drawn[0] == HUMAN:
                states[i].candidates[side][k] = Candidate(rows[i]["human"], HUMAN)
            else:
                pending.append((i, side, k, drawn[0], drawn[1]))
        if not pending:
            break
    return states


def _judge(rows: list[dict], states: list[_RowState], client: ModelClient) -> None:
    """Score every candidate in place; a judge answer without a score stays unscored with its reason."""
    slots, requests = [], []
    for i, (row, state) in enumerate(zip(rows, states)):
        for side, cands in state.candidates.items():
            for k, c in enumerate(cands):
                if c is not None:
                    slots.append((i, side, k))
                    requests.append({"prompt": row["prompt"], "response": c.text})
    for (i, side, k), verdict in zip(slots, client.score(requests) if requests else []):
        c = states[i].candidates[side][k]
        if "error" in verdict:
            states[i].failed.append({"source": "judge", **verdict["error"]})
            score, reason = None, f"judge_error:{verdict['error'].get('code', 'error')}"
        else:
            score, reason = verdict.get("score"), verdict.get("reason")
        states[i].candidates[side][k] = Candidate(c.text, c.source, score, reason, c.finish_reason, c.stop_token)


def form_batch(job: PairJob, rows: list[dict], client: ModelClient) -> list[dict]:
    """Pairs and per-prompt statistics for a batch of prompt rows; all requests of a round go out at once."""
    plans = [_plan_row(job, r) for r in rows]
    states = _generate_sides(job, rows, plans, client)
    _judge(rows, states, client)
    out = []
    for row, plan, state in zip(rows, plans, states):
        judged = {side: [c for c in cands if c is not None] for side, cands in state.candidates.items()}
        pairs, counts = form_pairs(
            row["id"], row["prompt"], judged["pos"], judged["neg"], judged["self"], job.rules,
            stage=job.stage, seed=job.seed, try_self=plan["try_self"],
            alpha_renormalized=plan["renorm"],
        )
        all_judged = [c for cands in judged.values() for c in cands]
        reject = None
        if not pairs and state.failed:
            first = state.failed[0]
            reject = {"line": row.get("line"), "id": row["id"], "reason": "generation_failed"
                      if first["source"] != "judge" else "judge_failed", "source": first["source"],
                      "detail": first.get("message", ""), "scope": "row"}
        out.append({
            "id": row["id"],
            "pairs": [p.to_row() for p in pairs],
            "counts": counts,
            "sources": {"pos": [s for s, _ in plan["pos"]], "neg": [s for s, _ in plan["neg"]]},
            "scores": {side: [c.score for c in judged[side]] for side in judged},
            "unscored": [c.unscored_reason or "unscored" for c in all_judged if c.score is None],
            "judged": len(all_judged),
            "truncated": state.truncated,
            "failed": state.failed,
            "redrawn": state.redrawn,
            "generated_tokens": state.generated_tokens,
            "unavailable": list(row.get("unavailable") or ()),
            "reject": reject,
        })
    return out


class _RayPairFormer:
    """Ray Data map_batches UDF: one ServeClient per actor, reused across batches. A batch's results
    come back as one row, so the driver journals whole batches."""

    def __init__(self, job: PairJob, app_name: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES):
        from tso.serving.client import ServeClient

        self.job, self.client = job, ServeClient(app_name, timeout_s=timeout_s, retries=retries)

    def __call__(self, batch: dict) -> dict:
        rows = [json.loads(r) for r in batch["row_json"]]
        return {"batch_json": [json.dumps(form_batch(self.job, rows, self.client))]}


def _to_dataset_rows(rows: list[dict]) -> list[dict]:
    """Each row as one JSON string: Arrow infers no column types (a column of chats, or one whose every
    human answer is missing, would otherwise come out as lists of structs or nulls/NaN)."""
    keep = ("id", "prompt", "human", "line", "unavailable")
    return [{"id": r["id"], "row_json": json.dumps({k: r.get(k) for k in keep})} for r in rows]


def run_with_ray_data(job: PairJob, rows: list[dict], app_name: str, batch_size: int = 16, concurrency: int = 2,
                      timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES):
    """Stream prompt rows through the Serve deployments with Ray Data; yields each batch's per-prompt results."""
    import ray

    ds = ray.data.from_items(_to_dataset_rows(rows), override_num_blocks=max(1, min(len(rows) // batch_size, 64)))
    ds = ds.map_batches(
        _RayPairFormer,
        fn_constructor_kwargs={"job": job, "app_name": app_name, "timeout_s": timeout_s, "retries": retries},
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=0.1,
    )
    for item in ds.iter_rows():
        yield json.loads(item["batch_json"])


def run_local(job: PairJob, rows: list[dict], client: ModelClient, batch_size: int = 16):
    """The same batches in this process; results pass through JSON as they do from Ray Data (and the
    journal), so every path hands the summary the same values."""
    for start in range(0, len(rows), batch_size):
        yield json.loads(json.dumps(form_batch(job, rows[start : start + batch_size], client)))


def summarize(results: list[dict], rejects: list[dict], over_limit: int, seconds: float,
              human_dropped: int = 0, truncated_action: str = "drop") -> dict:
    counts: Counter = Counter()
    chosen_src: Counter = Counter()
    rejected_src: Counter = Counter()
    drawn_pos: Counter = Counter()
    drawn_neg: Counter = Counter()
    unscored: Counter = Counter()
    truncated: Counter = Counter()
    failed: Counter = Counter()
    redrawn: Counter = Counter()
    unavailable: Counter = Counter()
    hist = {k: Counter() for k in ("pos", "neg", "self", "chosen", "rejected")}
    n_pairs = judged = tokens = 0
    for r in results:
        counts.update(r["counts"])
        drawn_pos.update(r["sources"]["pos"])
        drawn_neg.update(r["sources"]["neg"])
        unscored.update(r["unscored"])
        truncated.update(r.get("truncated", []))
        failed.update(f["source"] for f in r.get("failed", []))
        redrawn.update(src for _, src in r.get("redrawn", []))
        unavailable.update(r.get("unavailable", []))
        judged += r.get("judged", 0)
        tokens += r.get("generated_tokens", 0)
        for kind in ("pos", "neg", "self"):
            hist[kind].update(_bin(s) for s in r["scores"][kind])
        for p in r["pairs"]:
            n_pairs += 1
            chosen_src[p["chosen_source"]] += 1
            rejected_src[p["rejected_source"]] += 1
            hist["chosen"][_bin(p["chosen_score"])] += 1
            hist["rejected"][_bin(p["rejected_score"])] += 1
    scored = judged - sum(unscored.values())
    return {
        "prompts": len(results),
        "pairs": n_pairs,
        "pair_kinds": {k: v for k, v in counts.items() if k not in NO_PAIR_KEYS + SAMPLER_KEYS},
        "no_pair": {k: v for k, v in counts.items() if k in NO_PAIR_KEYS},
        **({"rso": {k.removeprefix("rso_"): counts.get(k, 0) for k in SAMPLER_KEYS}} if "rso_accepted" in counts else {}),
        "drawn_sources": {"positive": dict(drawn_pos), "negative": dict(drawn_neg)},
        "redrawn_sources": dict(redrawn),
        "unavailable_sources": dict(unavailable),
        "pair_sources": {"chosen": dict(chosen_src), "rejected": dict(rejected_src)},
        "score_histograms": {k: dict(sorted(v.items())) for k, v in hist.items()},
        "judge": {"judged": judged, "scored": scored, "parse_rate": round(scored / judged, 4) if judged else None},
        "unscored_judge_answers": dict(unscored),
        "truncated": dict(truncated),
        "truncated_action": truncated_action,
        "failed_requests": dict(failed),
        "rejects": dict(Counter(r["reason"] for r in rejects if r.get("scope", "row") == "row")),
        "rejected_rows": sum(1 for r in rejects if r.get("scope", "row") == "row"),
        "human_answers_dropped": human_dropped,
        "over_max_prompts": over_limit,
        "generated_tokens": tokens,
        "seconds": round(seconds, 3),
        "pairs_per_second": round(n_pairs / seconds, 3) if seconds > 0 else None,
        "generated_tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
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
            ("self_scores", pa.list_(pa.float64())),
            ("chosen_finish_reason", pa.string()), ("rejected_finish_reason", pa.string()),
            ("chosen_stop_token", pa.string()), ("rejected_stop_token", pa.string()),
            ("prompt_messages", pa.string()),
        ]
    )
    paths = {
        "pairs": atomic_write_parquet(out_dir / "pairs.parquet", rows, schema=schema),
        "rejects": out_dir / "rejects.jsonl",
    }
    write_rejects(rejects, paths["rejects"])
    paths["summary"] = atomic_write_json(out_dir / "summary.json", summary)  # written last: marks the step done
    return paths


def check_rows(cfg, rows: list[dict], policy_path: str | None = None, progress: bool = True
               ) -> tuple[list[dict], list[dict], int]:
    """Token-length checks of every row against the models that will see it (``limits``), in this
    process, before any model call. Returns (usable rows, rejects, human answers dropped)."""
    from tqdm import tqdm

    from tso.pairs.limits import RowLimits

    limits = RowLimits(cfg, policy_path=policy_path)
    kept, rejects, dropped = [], [], 0
    for row in tqdm(rows, desc="check prompt lengths", unit="prompt", disable=not progress, mininterval=2):
        row, reject, human = limits.check(row)
        if human is not None:
            rejects.append(human)
            dropped += 1
        if reject is not None:
            rejects.append(reject)
        else:
            kept.append(row)
    return kept, rejects, dropped


JOURNAL = ".journal"


class Journal:
    """The finished batches of one pair step (``<out_dir>/.journal/``), so that a step killed midway
    redoes only the rest: ``meta.json`` holds the digest of what decides the results, each
    ``batch-<n>.jsonl`` one batch's per-prompt results (each file written atomically)."""

    def __init__(self, out_dir: str | Path, digest: str):
        self.dir, self.digest, self.batches = Path(out_dir) / JOURNAL, digest, 0

    def open(self, meta: dict | None = None) -> dict[str, dict]:
        """The results journaled before under this digest, by prompt id. A journal of another digest
        (other config, prompts or weights) is removed: its results are not this step's."""
        from tso.io import atomic_write_json

        try:
            old = json.loads((self.dir / "meta.json").read_text()).get("digest")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != self.digest:
            if self.dir.exists():
                print(f"[pairs] {self.dir}: journal of other inputs (digest {old}, now {self.digest}): "
                      "removed, starting over", flush=True)
                shutil.rmtree(self.dir)
            atomic_write_json(self.dir / "meta.json", {**(meta or {}), "digest": self.digest})
            return {}
        done: dict[str, dict] = {}
        for path in sorted(self.dir.glob("batch-*.jsonl")):
            self.batches = max(self.batches, int(path.stem.split("-")[1]))
            try:
                batch = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            except ValueError as e:  # atomic writes make this unlikely: redo that batch's prompts
                print(f"[pairs] {path}: unreadable ({e}), its prompts are formed again", flush=True)
                continue
            for result in batch:
                done.setdefault(result["id"], result)
        return done

    def write(self, results: list[dict]) -> None:
        from tso.io import atomic_write_jsonl

        self.batches += 1
        atomic_write_jsonl(self.dir / f"batch-{self.batches:06d}.jsonl", results)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def pairs_digest(cfg, stage: int, served: dict[str, str] | None) -> str:
    """What decides a pair step's results: the config (its serving settings aside), the stage, the
    prompts file's bytes and the weights each deployment serves."""
    from tso.io import file_digest, json_digest

    return json_digest({"config": cfg.config_hash(), "stage": stage, "prompts": file_digest(cfg.pairs.prompts),
                        "served": served})


def _served(cfg, app_name: str | None, client: ModelClient | None) -> dict[str, str] | None:
    """The checkpoint each deployment serves now (None for a client that cannot say)."""
    from tso.serving.app import deployment_names
    from tso.serving.client import ServeClient

    if client is None:
        client = ServeClient.from_config(cfg, app_name)
    ask = getattr(client, "served_checkpoints", None)
    return ask(deployment_names(cfg)) if ask else None


def form_pairs_step(cfg, stage: int, out_dir: str | Path, *, app_name: str | None = None, client: ModelClient | None = None,
                    batch_size: int = 16, concurrency: int = 2, progress: bool = True) -> dict:
    """Read cfg.pairs.prompts, form pairs through Serve (or `client`), write pairs/summary/rejects.
    Resumes from the step's journal (module docstring); ``resumed_prompts`` says how many it reused."""
    from tqdm import tqdm

    from tso.pairs.prompts import read_prompts

    if not cfg.pairs.prompts:
        raise ValueError("pairs.prompts is not set: give a prompts JSONL/Parquet file")
    out_dir = Path(out_dir)
    app_name = app_name or cfg.serve.app_name
    prompts = read_prompts(cfg.pairs.prompts, cfg.pairs.max_prompt_chars, cfg.pairs.max_prompts)
    rows, length_rejects, human_dropped = check_rows(cfg, prompts.rows, progress=progress)
    job = PairJob.from_config(cfg, stage)
    journal = Journal(out_dir, pairs_digest(cfg, stage, _served(cfg, app_name, client)))
    done = journal.open({"stage": stage, "prompts_file": cfg.pairs.prompts})
    results = [done[r["id"]] for r in rows if r["id"] in done]
    todo, reused = [r for r in rows if r["id"] not in done], len(results)
    if reused:
        print(f"[pairs] stage {stage}: {reused} of {len(rows)} prompts formed before ({journal.dir}), "
              f"forming the other {len(todo)}", flush=True)
    start = time.perf_counter()
    if not todo:
        stream = iter(())
    elif client is None:
        stream = run_with_ray_data(job, todo, app_name, batch_size, concurrency, cfg.serve.call_timeout_s,
                                   cfg.serve.call_retries)
    else:
        stream = run_local(job, todo, client, batch_size)
    with tqdm(total=len(rows), initial=len(results), desc=f"pairs stage {stage}", unit="prompt",
              disable=not progress) as bar:
        for batch in stream:
            journal.write(batch)
            results.extend(batch)
            bar.update(len(batch))
    results.sort(key=lambda r: r["id"])  # the order the rows finished in (or were journaled) changes nothing
    rejects = prompts.rejects + length_rejects + [r["reject"] for r in results if r.get("reject")]
    rejects.sort(key=lambda r: (r.get("line") or 0, r.get("scope", "row")))
    summary = summarize(results, rejects, prompts.over_limit, time.perf_counter() - start, human_dropped,
                        cfg.pairs.truncated)
    summary.update({"stage": stage, "seed": cfg.seed, "prompts_file": cfg.pairs.prompts})
    paths = write_outputs(out_dir, results, summary, rejects)
    journal.remove()  # summary.json marks the step done: the journal has nothing left to give
    return {"summary": summary, "resumed_prompts": reused, **{f"{k}_path": str(v) for k, v in paths.items()}}
