"""REST scoring throughput and latency through Ray Serve, with replica-side batching on versus off.

Claim (docs/benchmarks.md): with Serve batching, ``POST /v1/score`` reaches at least 5x the
throughput of batch size 1 at 32 concurrent clients. Both configurations run in the same invocation
on the same model, the same machine and the same requests: the judge deployment with
``max_batch_size`` = ``--max-batch-size`` (on) and = 1 (off); everything else (max_ongoing_requests,
torch threads, the ingress) is identical. Each request scores one answer on every configured dimension
(2 judge generations of up to ``judge.sampling.max_new_tokens`` tokens, greedy).

The load generator (httpx, asyncio, loopback only, a bounded number of requests per level) runs in
this process and shares the machine's cores with Ray; the JSON records the machine and its load.

    python benchmarks/bench_serving.py                 # full run -> benchmarks/results/serving.json
    python benchmarks/bench_serving.py --quick --out /tmp/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "results" / "serving.json"
APP = "tso-bench-serving"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few requests, short judge answers (a smoke run)")
    p.add_argument("--model-dir", help="a Hugging Face model directory to judge with (default: a random tiny Llama)")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels, comma separated")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: 16 per client, 48..256; quick: 2 per client, at least 8)")
    p.add_argument("--max-batch-size", type=int, default=32, help="the judge's max_batch_size with batching on")
    p.add_argument("--batch-wait-s", type=float, default=0.01, help="batch_wait_timeout_s with batching on")
    p.add_argument("--max-new-tokens", type=int, default=None, help="judge answer budget (default 64; quick 16)")
    p.add_argument("--port", type=int, default=18180, help="Serve HTTP port (loopback)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output path")
    return p.parse_args(argv)


def machine_info() -> dict:
    import ray
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "cuda": torch.cuda.is_available(),
    }
    try:
        info["load_average_1m_5m_15m"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def serve_processes() -> dict:
    """The processes on the request path, to report CPU time per request where it is spent."""
    import psutil

    keys = {"proxy": "ProxyActor", "ingress": f"ServeReplica:{APP}:ingress", "judge": f"ServeReplica:{APP}:judge",
            "controller": "ServeController"}
    found = {"load_generator_and_driver": psutil.Process()}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        for name, key in keys.items():
            if cmd.startswith("ray::") and key in cmd:
                found[name] = proc
    return found


def cpu_seconds(procs: dict) -> dict:
    out = {}
    for name, proc in procs.items():
        try:
            t = proc.cpu_times()
            out[name] = t.user + t.system
        except Exception:  # a process that went away
            out[name] = float("nan")
    return out


def build_model_dir(root: Path) -> Path:
    from tso.toyworld.tokenizer import build_tokenizer
    from tso.zoo.tiny import random_tiny_llama, save_model_dir

    tok = build_tokenizer()
    return save_model_dir(random_tiny_llama(tok, seed=0), tok, root / "tiny-judge-random")


def run_config(model_dir: str, args, max_batch_size: int, run_dir: str, generate_on: str = "thread"):
    from tso.config import parse_config

    engine = {"kind": "transformers", "torch_threads": 1, "max_batch_size": max_batch_size,
              "batch_wait_timeout_s": args.batch_wait_s if max_batch_size > 1 else 0.0, "generate_on": generate_on}
    resources = {"num_cpus": 0.25, "max_ongoing_requests": max(64, args.max_batch_size)}
    return parse_config({
        "run_dir": run_dir,
        # the matrix is required by the config; only the judge (and the ingress) are deployed
        "matrix": {"base": "base", "models": [
            {"name": "old", "path": model_dir, "version": 0, "size": 1},
            {"name": "base", "path": model_dir, "version": 1, "size": 1},
        ]},
        "judge": {"path": model_dir, "engine": engine, "resources": resources,
                  "sampling": {"temperature": 0.0, "max_new_tokens": args.max_new_tokens}},
        "serve": {"host": "127.0.0.1", "port": args.port, "app_name": APP, "auth_token_env": "TSO_BENCH_NO_TOKEN"},
    })


def _request(i: int) -> dict:
    return {"prompt": f"Question {i}: what is {i % 97} plus {(7 * i) % 89}?",
            "response": f"The answer is {(i % 97) + (7 * i) % 89}." + " Indeed." * (i % 4)}


async def run_level(url: str, clients: int, n_requests: int, procs: dict | None = None) -> dict:
    """``clients`` workers send ``n_requests`` score requests in total, each waiting for its answer; a
    probe asks ``GET /v1/models`` (each deployment's ``info``) every 0.2 s meanwhile, as a dashboard or a
    health check would: how long a cheap call waits behind generation."""
    import httpx

    latencies: list[float] = []
    probes: list[float] = []
    running = True
    errors = 0
    next_i = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        for i in range(min(clients, 4)):  # warm-up (connections, first batches)
            await c.post("/v1/score", json=_request(10_000 + i))

        async def worker():
            nonlocal next_i, errors
            while next_i < n_requests:
                i = next_i
                next_i += 1
                t = time.perf_counter()
                r = await c.post("/v1/score", json=_request(i))
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors += 1

        async def probe():
            async with httpx.AsyncClient(base_url=url, timeout=300) as p:
                while running:
                    t = time.perf_counter()
                    await p.get("/v1/models")
                    probes.append(time.perf_counter() - t)
                    await asyncio.sleep(0.2)

        async def load():
            nonlocal running
            await asyncio.gather(*(worker() for _ in range(clients)))
            running = False

        cpu_before = cpu_seconds(procs or {})
        start = time.perf_counter()
        await asyncio.gather(load(), probe())
        wall = time.perf_counter() - start
        cpu_after = cpu_seconds(procs or {})
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": n_requests,
        "errors": errors,
        "wall_s": round(wall, 4),
        "throughput_rps": round(n_requests / wall, 3),
        "latency_p50_ms": round(1000 * statistics.median(lat), 2),
        "latency_p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
        "latency_mean_ms": round(1000 * statistics.fmean(lat), 2),
        "info_probes": len(probes),
        "info_latency_p50_ms": round(1000 * statistics.median(probes), 2) if probes else None,
        "info_latency_max_ms": round(1000 * max(probes), 2) if probes else None,
        # CPU time each process on the request path spent per request (where the time goes)
        "cpu_ms_per_request": {k: round(1000 * (cpu_after[k] - cpu_before[k]) / n_requests, 2) for k in cpu_before},
    }


def requests_for(clients: int, args) -> int:
    if args.requests:
        return args.requests
    if args.quick:
        return max(8, 2 * clients)
    return min(256, max(48, 16 * clients))


def measure(cfg, args, levels: list[int], label: str) -> dict:
    from ray import serve

    from tso.serving.app import deploy

    t = time.perf_counter()
    deploy(cfg, port=args.port, include=["judge"])
    deploy_s = time.perf_counter() - t
    judge = serve.get_deployment_handle("judge", APP)
    url = f"http://127.0.0.1:{args.port}"
    out = {"max_batch_size": cfg.judge.engine.max_batch_size,
           "batch_wait_timeout_s": cfg.judge.engine.batch_wait_timeout_s,
           "deploy_s": round(deploy_s, 2), "levels": {}}
    procs = serve_processes()
    for clients in levels:
        judge.stats.remote(reset=True).result()
        res = asyncio.run(run_level(url, clients, requests_for(clients, args), procs))
        stats = judge.stats.remote().result()
        res["judge_batches"] = stats["batches"]
        res["judge_mean_batch_rows"] = round(stats["mean_batch_requests"], 2)
        res["judge_max_batch_rows"] = stats["max_batch_requests"]
        out["levels"][str(clients)] = res
        print(f"[{label}] {clients:>3} clients: {res['throughput_rps']:8.2f} req/s  p50 {res['latency_p50_ms']:8.1f} ms"
              f"  p99 {res['latency_p99_ms']:8.1f} ms  mean batch {res['judge_mean_batch_rows']}"
              f"  info p50 {res['info_latency_p50_ms']} ms max {res['info_latency_max_ms']} ms", flush=True)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 16 if args.quick else 64
    levels = [int(x) for x in args.clients.split(",") if x.strip()]

    import ray
    from ray import serve

    started_ray = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        started_ray = True
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="tso-bench-serving-") as tmp:
        model_dir = str(Path(args.model_dir).resolve()) if args.model_dir else str(build_model_dir(Path(tmp)))
        serve.shutdown()  # Serve's HTTP port is fixed once started: start it on ours
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        try:
            on = measure(run_config(model_dir, args, args.max_batch_size, tmp), args, levels, "batching on")
            on_loop = measure(run_config(model_dir, args, args.max_batch_size, tmp, "event_loop"), args, levels,
                              "batching on, event loop")
            off = measure(run_config(model_dir, args, 1, tmp), args, levels, "batching off")
        finally:
            serve.delete(APP)
            serve.shutdown()
            if started_ray:
                ray.shutdown()
    top = str(max(levels))
    ratio = on["levels"][top]["throughput_rps"] / off["levels"][top]["throughput_rps"]
    thread_ratio = on["levels"][top]["throughput_rps"] / on_loop["levels"][top]["throughput_rps"]
    result = {
        "benchmark": "serving_rest_score",
        "claim": "REST scoring with Serve batching >= 5x the throughput of batch size 1 at 32 concurrent clients",
        "quick": args.quick,
        "machine": machine,
        "settings": {
            "model_dir": model_dir if args.model_dir else "random tiny Llama (hidden 64, 2 layers, byte tokenizer)",
            "endpoint": "POST /v1/score (all configured dimensions: 2 judge generations per request)",
            "judge_max_new_tokens": args.max_new_tokens,
            "decoding": "greedy",
            "torch_threads_per_replica": 1,
            "max_ongoing_requests": max(64, args.max_batch_size),
            "levels": levels,
            "load_generator": "httpx.AsyncClient in the benchmark process (shares the cores), loopback",
        },
        "baseline": "batching_off",
        "configurations": {"batching_on": on, "batching_on_event_loop": on_loop, "batching_off": off},
        "load_average_at_end": list(os.getloadavg()),
        "ratio_clients": int(top),
        "ratio_on_over_off": round(ratio, 3),
        "target_ratio": 5.0,
        "meets_target": ratio >= 5.0,
        # engine.generate_on: the default (a generation thread) against generating on the event loop
        "thread_over_event_loop": round(thread_ratio, 3),
        "info_p50_ms_thread_vs_event_loop": [on["levels"][top]["info_latency_p50_ms"],
                                             on_loop["levels"][top]["info_latency_p50_ms"]],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(f"batching on / off at {top} clients: {ratio:.2f}x (target 5x); generation thread / event loop: "
          f"{thread_ratio:.2f}x -> {out}", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
