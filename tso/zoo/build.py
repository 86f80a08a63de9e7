"""Build the tiny model matrix on CPU: SFT on the toy world's "train" split, held-out evaluation with
the verifier, the manifest, and the quality ladder check.

Deterministic for a seed (and thread count); a model whose manifest entry has the same build
settings and whose folder exists is skipped; every model folder is written under a temporary name
and renamed into place, and the manifest is rewritten (atomically) after every model.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from tso.io import atomic_dir
from tso.toyworld import tasks as toy_tasks
from tso.toyworld.style import styled_answer
from tso.toyworld.tokenizer import build_tokenizer
from tso.toyworld.verifier import exact_match, verify, verify_dimensions
from tso.zoo.generate import generate_answers
from tso.zoo.ladder import check_ladder
from tso.zoo.manifest import empty_manifest, read_manifest, settings_hash, write_manifest
from tso.zoo.sft import encode_examples, sft_train
from tso.zoo.spec import DEMO_MATRIX, FIXTURE_MATRIX, MatrixSpec, ModelSpec, matrix_entries, matrix_section
from tso.zoo.tiny import random_tiny_llama, save_model_dir

# Bump when the toy world, the SFT recipe or the verifier change in a way that changes models/scores.
TRAIN_RECIPE = "sft-v1"
EVAL_RECIPE = "greedy-v1"


def zoo_dir(home: str | Path | None = None) -> Path:
    from tso.config import tso_home

    return Path(home if home is not None else tso_home()) / "zoo"


def model_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|zoo|{name}".encode()).digest()[:4], "big") % (2**31 - 1)


def train_settings(spec: MatrixSpec, m: ModelSpec, seed: int) -> dict:
    """Everything that determines a model's weights (a parent's settings included)."""
    parent = train_settings(spec, spec.model(m.init_from), seed) if m.init_from else None
    return {
        "recipe": TRAIN_RECIPE, "seed": seed, "name": m.name, "shape": m.shape(), "budget": m.budget.to_dict(),
        "init_from": parent, "pool_size": spec.pool_size, "families": list(m.families or toy_tasks.FAMILIES),
        **({"chatter": m.chatter} if m.chatter else {}),  # absent at 0: earlier builds keep their hash
    }


def eval_settings(spec: MatrixSpec, seed: int, eval_prompts: int) -> dict:
    return {"recipe": EVAL_RECIPE, "seed": seed, "prompts": eval_prompts, "max_new_tokens": spec.max_new_tokens,
            "decoding": "greedy", "split": "eval"}


def _atomic_save(model, tokenizer, target: Path) -> None:
    with atomic_dir(target) as tmp:
        save_model_dir(model, tokenizer, tmp)


def held_out_quality(model, tokenizer, eval_tasks: list[dict], max_new_tokens: int, batch_size: int = 128) -> dict:
    """Held-out quality: mean verifier score (greedy decoding), exact-match rate, per family/dimension."""
    answers = generate_answers(model, tokenizer, [t["prompt"] for t in eval_tasks], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    scores = [verify(t, a) for t, a in zip(eval_tasks, answers)]
    dims = defaultdict(list)
    fam = defaultdict(list)
    for t, a, s in zip(eval_tasks, answers, scores):
        fam[t["family"]].append(s)
        for k, v in verify_dimensions(t, a).items():
            dims[k].append(v)
    n = len(scores)
    return {
        "heldout_score": round(sum(scores) / n, 4),
        "heldout_exact": round(sum(exact_match(t, a) for t, a in zip(eval_tasks, answers)) / n, 4),
        "heldout_dimensions": {k: round(sum(v) / len(v), 4) for k, v in dims.items()},
        "family_scores": {k: round(sum(v) / len(v), 3) for k, v in sorted(fam.items())},
        "answers": answers,
    }


def _load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _entry(spec: MatrixSpec, m: ModelSpec, zoo: Path, model, result: dict, stats: dict, parent_entry: dict | None,
           train_seconds: float, eval_seconds: float, tr_hash: str, ev_hash: str) -> dict:
    params = sum(p.numel() for p in model.parameters())
    prev = (parent_entry or {}).get("training", {})
    b = m.budget
    return {
        "name": m.name, "version": m.version, "size_label": m.size_label,
        "size": round(params / 1e6, 4), "params": params, "path": str(zoo / m.name), "shape": m.shape(),
        "training": {
            "steps": b.steps, "batch": b.batch, "lr": b.lr, "warmup": b.warmup, "pool": b.pool,
            "examples_seen": b.steps * b.batch, "init_from": m.init_from,
            "families": list(m.families or toy_tasks.FAMILIES),
            "total_steps": prev.get("total_steps", 0) + b.steps,
            "total_examples_seen": prev.get("total_examples_seen", 0) + b.steps * b.batch,
            "loss": {k: round(v, 4) for k, v in stats.items()} if stats else {},
        },
        "heldout_score": result["heldout_score"],
        "heldout_exact": result["heldout_exact"],
        "heldout_dimensions": result["heldout_dimensions"],
        "family_scores": result["family_scores"],
        "train_seconds": round(train_seconds, 2), "eval_seconds": round(eval_seconds, 2),
        "build_seconds": round(train_seconds + eval_seconds, 2),
        "train_hash": tr_hash, "eval_hash": ev_hash, "status": "built",
    }


def _run_chain(spec: MatrixSpec, zoo: Path, seed: int, n_eval: int, items: list, parents: dict, threads: int,
               report) -> None:
    """Train and/or evaluate ``items`` [(model name, train hash, eval hash, "train"|"evaluate")] in order,
    reporting ("step", name, n) and ("done", name, entry). Runs in-process or in a worker process."""
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would break the build's own bar
    tokenizer = build_tokenizer()
    eval_tasks = toy_tasks.generate_tasks("eval", n_eval, seed)
    examples: dict[tuple, list] = {}
    entries = dict(parents)
    for name, tr_hash, ev_hash, what in items:
        m = spec.model(name)
        t0 = time.perf_counter()
        if what == "train":
            fams = tuple(m.families or toy_tasks.FAMILIES)
            key = (fams, m.chatter)
            if key not in examples:
                pool = toy_tasks.training_pool("train", spec.pool_size, seed, fams)
                pool = [{**t, "human": styled_answer(t, m.chatter, seed)} for t in pool]
                examples[key] = encode_examples(tokenizer, pool)
            if m.init_from:
                model = _load_model(zoo / m.init_from)
            else:
                model = random_tiny_llama(tokenizer, seed=model_seed(seed, m.name), **m.shape())
            pending = [0]

            def on_step(step: int, loss: float, _name=name, _pending=pending) -> None:
                _pending[0] += 1
                if _pending[0] >= 10:
                    report(("step", _name, _pending[0], loss))
                    _pending[0] = 0

            stats = sft_train(model, examples[key][: m.budget.pool], m.budget, model_seed(seed, m.name) + 1,
                              tokenizer.pad_token_id, on_step=on_step)
            if pending[0]:
                report(("step", name, pending[0], stats["final_loss"]))
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            _atomic_save(model, tokenizer, zoo / name)
            train_seconds = time.perf_counter() - t0
        else:
            model = _load_model(zoo / name)
            old = entries.get(name) or {}
            stats = (old.get("training") or {}).get("loss", {})
            train_seconds = old.get("train_seconds") or 0.0
        t1 = time.perf_counter()
        result = held_out_quality(model, tokenizer, eval_tasks, spec.max_new_tokens, spec.eval_batch)
        entry = _entry(spec, m, zoo, model, result, stats, entries.get(m.init_from) if m.init_from else None,
                       train_seconds, time.perf_counter() - t1, tr_hash, ev_hash)
        entry["trained"] = what == "train"
        entries[name] = entry
        report(("done", name, entry))


def _worker(spec, zoo, seed, n_eval, items, parents, threads, queue) -> None:
    try:
        _run_chain(spec, zoo, seed, n_eval, items, parents, threads, queue.put)
        queue.put(("exit", None, time.process_time()))
    except BaseException:  # reported to the parent, which fails the build
        import traceback

        queue.put(("error", None, traceback.format_exc()))


def _chains(spec: MatrixSpec, plan: list) -> list[list]:
    """Independent chains of the plan: one per size (a version continues the previous one)."""
    chains: dict[str, list] = {}
    for item in plan:
        chains.setdefault(spec.model(item[0]).size_label, []).append(item)
    return list(chains.values())


def _cost(spec: MatrixSpec, chain: list) -> float:
    from tso.zoo.spec import count_params

    return sum(spec.model(n).budget.steps * spec.model(n).budget.batch * (count_params(spec.model(n)) + 20_000)
               for n, _, _, what in chain if what == "train") + 1.0


def _assign(spec: MatrixSpec, chains: list[list], workers: int) -> list[list]:
    """Longest chain first onto the least loaded worker."""
    groups: list[tuple[float, list]] = [(0.0, []) for _ in range(workers)]
    for chain in sorted(chains, key=lambda c: -_cost(spec, c)):
        i = min(range(workers), key=lambda k: groups[k][0])
        groups[i] = (groups[i][0] + _cost(spec, chain), groups[i][1] + chain)
    return [g for _, g in groups if g]


def build_matrix(home: str | Path | None = None, spec: MatrixSpec = DEMO_MATRIX, seed: int = 0, force: bool = False,
                 eval_prompts: int | None = None, threads: int = 1, workers: int | None = None,
                 progress: bool = True, log=print) -> dict:
    """Build (or complete) a matrix under ``home``/zoo and return its manifest.

    Sizes are independent chains (a version continues the one before it), trained in ``workers``
    processes (default: one per core, at most 2; 1 = in this process) with ``threads`` torch
    threads each. The manifest's ``status`` is "ok", or "failed" with ``reasons`` when the ladder
    does not hold (for specs that enforce it).
    """
    zoo = zoo_dir(home)
    zoo.mkdir(parents=True, exist_ok=True)
    n_eval = eval_prompts or spec.eval_prompts
    workers = workers or min(2, os.cpu_count() or 1)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    manifest = read_manifest(zoo) or empty_manifest()
    manifest.update({
        "matrix": spec.name, "status": "building", "reasons": [], "seed": seed, "base": spec.base,
        "threads": threads, "workers": workers,
        "eval": {"prompts": n_eval, "split": "eval", "decoding": "greedy", "max_new_tokens": spec.max_new_tokens},
    })
    manifest["models"] = {k: v for k, v in manifest.get("models", {}).items() if k in {m.name for m in spec.models}}
    eval_count = len(toy_tasks.generate_tasks("eval", n_eval, seed))
    manifest["eval"]["prompts"] = eval_count
    ev_hash = settings_hash(eval_settings(spec, seed, eval_count))

    plan, retrain = [], set()
    for m in spec.ordered():
        tr_hash = settings_hash(train_settings(spec, m, seed))
        entry = manifest["models"].get(m.name)
        built = (not force and m.init_from not in retrain and entry is not None
                 and entry.get("train_hash") == tr_hash and (zoo / m.name / "config.json").is_file())
        if built and entry.get("eval_hash") == ev_hash and entry.get("status") == "built":
            continue
        if not built:
            retrain.add(m.name)
        plan.append((m.name, tr_hash, ev_hash, "evaluate" if built else "train"))
    skipped = [m.name for m in spec.models if m.name not in {p[0] for p in plan}]
    if skipped:
        log(f"zoo: {', '.join(skipped)} already built with these settings (use --force to rebuild)")
    write_manifest(zoo, manifest)

    total_steps = sum(spec.model(n).budget.steps for n, _, _, what in plan if what == "train")
    bar = tqdm(total=total_steps, unit="step", desc=f"zoo build ({spec.name})",
               disable=not progress or not total_steps, dynamic_ncols=True)
    parents = {k: v for k, v in manifest["models"].items()}
    worker_cpu = 0.0

    def handle(msg) -> None:
        kind, name, payload = msg[0], msg[1], msg[2]
        if kind == "step":
            bar.update(payload)
            bar.set_postfix_str(f"{name} loss {msg[3]:.3f}")
        elif kind == "done":
            manifest["models"][name] = payload
            write_manifest(zoo, manifest)
            bar.write(f"zoo: {name} ({payload['params'] / 1e6:.3f}M params, "
                      f"{'trained' if payload['trained'] else 'evaluated'}) held-out {payload['heldout_score']:.2f}, "
                      f"exact {payload['heldout_exact']:.0%} [{payload['build_seconds']:.0f} s]")

    groups = _assign(spec, _chains(spec, plan), workers) if plan else []
    old_threads = torch.get_num_threads()
    try:
        if len(groups) <= 1:
            for group in groups:
                _run_chain(spec, zoo, seed, n_eval, group, parents, threads, handle)
        else:
            worker_cpu = _run_workers(spec, zoo, seed, n_eval, groups, parents, threads, handle)
    except BaseException:
        manifest["status"], manifest["reasons"] = "failed", ["the build was interrupted or a worker failed"]
        write_manifest(zoo, manifest)
        raise
    finally:
        bar.close()
        torch.set_num_threads(old_threads)

    manifest["build_seconds"] = round(time.perf_counter() - t_start, 2)
    manifest["build_cpu_seconds"] = round(time.process_time() - cpu_start + worker_cpu, 2)
    ladder = check_ladder(manifest)
    manifest["ladder"] = ladder.to_dict() | {"enforced": spec.enforce_ladder}
    if spec.enforce_ladder and not ladder.ok:
        manifest["status"], manifest["reasons"] = "failed", list(ladder.reasons)
    else:
        manifest["status"], manifest["reasons"] = "ok", []
    write_manifest(zoo, manifest)
    return manifest


def _run_workers(spec, zoo, seed, n_eval, groups, parents, threads, handle) -> float:
    """Run each group of chains in its own (spawned) process; returns the workers' CPU seconds."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        procs = [ctx.Process(target=_worker, args=(spec, zoo, seed, n_eval, g, parents, threads, q), daemon=True)
                 for g in groups]
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    running, cpu = len(procs), 0.0
    try:
        while running:
            try:
                msg = q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"a zoo build worker died (exit code {dead[0].exitcode})") from None
                continue
            if msg[0] == "error":
                raise RuntimeError(f"a zoo build worker failed:\n{msg[2]}")
            if msg[0] == "exit":
                running -= 1
                cpu += msg[2]
                continue
            handle(msg)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
        q.close()
        q.join_thread()
    return cpu


def build_fixture_matrix(home: str | Path, seed: int = 0, force: bool = False, progress: bool = False) -> dict:
    """A tiny matrix with the demo's names and layout (v1-s ... v2-l, base v2-m) under ``home``/zoo,
    built in seconds, for tests of other areas. Its models generate text but the ladder is not
    promised. Returns the manifest; ``fixture_matrix_entries(home)`` gives names, sizes, paths."""
    return build_matrix(home, FIXTURE_MATRIX, seed=seed, force=force, workers=1, progress=progress,
                        log=lambda *_: None)


def demo_matrix_entries(home: str | Path | None = None) -> list[dict]:
    """The demo matrix's models: name, version, size (params in M), size_label, params, path, base."""
    return matrix_entries(home, DEMO_MATRIX)


def fixture_matrix_entries(home: str | Path) -> list[dict]:
    return matrix_entries(home, FIXTURE_MATRIX)


def fixture_matrix_section(home: str | Path) -> dict:
    return matrix_section(home, FIXTURE_MATRIX)
