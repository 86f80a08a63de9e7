"""Pair formation throughput: Serve + Ray Data versus the same generation and judging in one process.

Both sides run `tso.pairs.pipeline.form_batch` over the same prompts, models, sampling and batch size:
the baseline with `InProcessClient` (the engines in this process, no Ray), the pipeline with Ray Data
streaming batches to the Serve deployments (`ServeClient`). Each engine uses the same torch thread
count on both sides. The ratio pipeline_seconds / local_seconds is the pipeline's overhead (target:
<= 1.15). Model loading and deployment are outside the timed region; both
sides get a warm-up batch first.

    python benchmarks/bench_pairs.py [--quick] [--zoo] [--out benchmarks/results/pairs.json]
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


def _tiny_models(root: Path) -> dict[str, str]:
    from tso.toyworld.tokenizer import build_tokenizer
    from tso.zoo.tiny import random_tiny_llama, save_model_dir

    tok = build_tokenizer()
    return {name: str(save_model_dir(random_tiny_llama(tok, seed=seed), tok, root / name))
            for name, seed in (("a", 1), ("b", 2), ("c", 3), ("judge", 4))}


def _config(dirs: dict[str, str], prompts: Path, run_dir: Path, args) -> object:
    from tso.config import parse_config

    engine = {"kind": "transformers", "torch_threads": args.threads, "max_batch_size": args.max_batch,
              "batch_wait_timeout_s": 0.02}
    res = {"num_cpus": 0.2, "max_ongoing_requests": 4 * args.max_batch}
    models = [("a", 1, 1.0), ("b", 1, 2.0), ("c", 1, 4.0)]
    return parse_config({
        "run_dir": str(run_dir), "seed": 43,
        "matrix": {"base": "b", "models": [{"name": n, "path": dirs[n], "version": v, "size": s, "engine": engine,
                                            "resources": res} for n, v, s in models]},
        "judge": {"path": dirs["judge"], "engine": engine, "resources": res,
                  "sampling": {"temperature": 0.0, "max_new_tokens": args.judge_tokens}},
        # random models never stop: keep their cut answers, so every prompt does the same work on both sides
        "pairs": {"prompts": str(prompts), "n_self": 2, "truncated": "keep",
                  "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": args.new_tokens}},
        "serve": {"port": args.port, "app_name": "tso-bench-pairs"},
    })


def _prompts(path: Path, n: int) -> Path:
    rows = [{"id": f"b{i:04d}", "prompt": f"What is {i} plus {i % 7}?", "human": str(i + i % 7)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few prompts: checks the script, not the speed")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per batch on both sides")
    ap.add_argument("--concurrency", type=int, default=2, help="Ray Data actors")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine, both sides")
    ap.add_argument("--max-batch", type=int, default=64, help="Serve max_batch_size per replica")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--judge-tokens", type=int, default=16)
    ap.add_argument("--port", type=int, default=18401)
    ap.add_argument("--out", default="benchmarks/results/pairs.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.batch_size, args.new_tokens, args.judge_tokens = 8, 4, 4, 4

    import ray
    import torch
    from ray import serve

    from tso.pairs.pipeline import form_pairs_step
    from tso.serving.app import deploy
    from tso.serving.client import InProcessClient

    tmp = Path(tempfile.mkdtemp(prefix="tso-bench-pairs-"))
    dirs = _tiny_models(tmp / "models")
    cfg = _config(dirs, _prompts(tmp / "prompts.jsonl", args.prompts), tmp / "run", args)
    warm = _config(dirs, _prompts(tmp / "warm.jsonl", args.batch_size), tmp / "run", args)

    torch.set_num_threads(args.threads)
    local = InProcessClient(cfg)
    form_pairs_step(warm, 1, tmp / "warm-local", client=local, batch_size=args.batch_size, progress=False)
    start = time.perf_counter()
    local_res = form_pairs_step(cfg, 1, tmp / "local", client=local, batch_size=args.batch_size, progress=False)
    local_s = time.perf_counter() - start
    del local

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        deploy(cfg, port=args.port)
        form_pairs_step(warm, 1, tmp / "warm-ray", app_name="tso-bench-pairs", batch_size=args.batch_size,
                        concurrency=args.concurrency, progress=False)
        start = time.perf_counter()
        ray_res = form_pairs_step(cfg, 1, tmp / "ray", app_name="tso-bench-pairs", batch_size=args.batch_size,
                                  concurrency=args.concurrency, progress=False)
        ray_s = time.perf_counter() - start
    finally:
        serve.shutdown()
        ray.shutdown()

    same = (tmp / "local" / "pairs.parquet").read_bytes() == (tmp / "ray" / "pairs.parquet").read_bytes()
    n_pairs = ray_res["summary"]["pairs"]
    result = {
        "benchmark": "pair formation: Serve + Ray Data vs one process",
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "baseline": {"name": "one process, no Ray (InProcessClient)", "seconds": round(local_s, 3),
                     "pairs": local_res["summary"]["pairs"], "pairs_per_s": round(local_res["summary"]["pairs"] / local_s, 3)},
        "pipeline": {"name": "Ray Data -> Serve deployments (ServeClient)", "seconds": round(ray_s, 3),
                     "pairs": n_pairs, "pairs_per_s": round(n_pairs / ray_s, 3)},
        "ratio_pipeline_over_baseline_seconds": round(ray_s / local_s, 3),
        "target_ratio_at_most": 1.15,
        "identical_pairs": same,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
