"""DPO training throughput: tso's trainer versus TRL's DPOTrainer, same model, data and batch, one run.

Claim (docs/benchmarks.md): tso's step and mini-batch code (the code a Ray Train worker runs,
here without Ray, in one process; the reference pass at every mini-batch boundary included) trains
faster than TRL's DPOTrainer at equal numerics. Configurations, each in its own fresh subprocess
(clean peak memory, no shared process group) with the same torch thread count:

- ``tso_deepspeed``: ``run_minibatch_dpo`` on a ``deepspeed.initialize`` engine (ZeRO stage from
  ``--zero-stage``; torch AdamW), K mini-batches, the reference computed by the policy at each boundary.
- ``tso_torch``: the same loop on the plain-PyTorch engine (shows what DeepSpeed costs in one process).
- ``tso_torch_compiled``: ``tso_torch`` with ``train.compile`` (the decoder under ``torch.compile``,
  dynamic shapes); its compile time falls in the warm-up steps and in any step that recompiles.
- ``trl_tuned``: DPOTrainer, gradient checkpointing off, ``precompute_ref_log_probs=True`` (TRL's own
  version of the hot-swap advantage: one reference pass, no reference model in the steps);
  ``torch_compile=True`` on GPU only (on CPU inductor's compile time dwarfs these short runs).
- ``trl_ref_model``: DPOTrainer, gradient checkpointing off, a reference model forward in every step.
- ``trl_shipped``: DPOConfig defaults (gradient checkpointing on, ``bf16=True``): "as shipped". Full
  mode only, few steps (slow on CPU; its numerics are bf16 autocast on CPU too).

Numerics: fp32 on CPU for tso and the TRL baselines; on GPU fp32 master weights and Adam states with bf16
compute for both (tso: DeepSpeed bf16 / torch autocast; TRL: ``bf16=True`` autocast). Same optimizer
(AdamW, betas, weight decay, clip), the same cosine schedule, DPO sigmoid loss, beta 0.1.

Each configuration runs ``--repeats`` times, interleaved round-robin with the others; its reported numbers
are from its best run (``pairs_per_s_median`` and ``ratios_median`` beside them), because on a shared
machine the best run is the least disturbed one.

Throughput: pairs/s over the timed steps (after ``warmup`` steps), with each side's reference work
(tso's K boundary passes, TRL's precompute pass) amortised over the steps: both cover the data once.
On GPU, MFU = (6 N tokens [+ 2 N tokens / E for the reference]) / time / peak.

    python benchmarks/bench_dpo.py                          # CPU shape -> benchmarks/results/dpo_cpu.json
    python benchmarks/bench_dpo.py --quick --out /tmp/dpo.json   # a smoke run on a much smaller model
    python benchmarks/bench_dpo.py --shape cpu-realvocab    # SmolLM2-135M architecture, vocabulary 49,152,
                                                            # variable lengths -> dpo_cpu-realvocab.json
    python benchmarks/bench_dpo.py --shape gpu-reference    # one H100/H200 -> benchmarks/results/dpo_gpu-reference.json

Shapes give ``prompt`` / ``response`` either as a fixed length in tokens or as ``[lo, hi]``: then each pair's
prompt, chosen and rejected lengths are drawn uniformly (inclusive) from a ``random.Random(0)`` stream, the
same pairs for every configuration. pairs/s counts pairs; tokens/s counts real (unpadded) tokens, each
prompt once per row; ``pairs_per_s_length_normalised`` = real tokens/s / the data set's mean tokens per
pair (the fair figure when a configuration is timed over a few steps of variable length).
On CPU each tso run also times its phases (forward with log-probs, the LM-head log-probs alone, backward,
optimizer step, reference passes, the rest): ``phases_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path(__file__).parent / "results"
SHAPES: dict[str, dict[str, Any]] = {
    # docs/benchmarks.md, "DPO on CPU": 3.4M parameters, 16 pairs x (32 + 64) tokens
    "cpu": {"hidden": 256, "intermediate": 688, "layers": 4, "heads": 4, "vocab": 512,
            "pairs_per_step": 16, "micro_batch": 16, "prompt": 32, "response": 64},
    # docs/benchmarks.md, "DPO on one GPU": 1.24B parameters, 8 pairs x (256 + 512) tokens
    "gpu-reference": {"hidden": 2048, "intermediate": 5504, "layers": 22, "heads": 16, "vocab": 32000,
                      "pairs_per_step": 8, "micro_batch": 8, "prompt": 256, "response": 512},
    # docs/benchmarks.md, "DPO on CPU, real vocabulary": the SmolLM2-135M architecture (hidden 576, 9 heads /
    # 3 KV heads, tied embeddings, vocabulary 49,152) with 4 of its 30 layers (CPU time), random init,
    # variable-length pairs: prompts 32-256 tokens, chosen and rejected 16-256 each
    "cpu-realvocab": {"hidden": 576, "intermediate": 1536, "layers": 4, "heads": 9, "kv_heads": 3, "vocab": 49152,
                      "tied": True, "pairs_per_step": 8, "micro_batch": 4, "prompt": [32, 256],
                      "response": [16, 256]},
}
# run settings a shape defaults to (flags override): the real-vocabulary CPU run fits in about 10 minutes on 2
# cores (TRL with a reference model, the slowest extra, is left out unless --configs names it)
SHAPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu-realvocab": {"minibatches": 2, "epochs": 2, "steps_per_epoch": 1, "warmup": 1, "repeats": 1,
                      "configs": "tso_deepspeed,tso_torch,trl_tuned,trl_shipped"},
}
GPU_SHAPES = ("gpu-reference",)
# --quick: the same comparison on a very small model, so that one test can run it (it checks the code, not speed)
QUICK_SHAPE = {"hidden": 64, "intermediate": 176, "layers": 2, "heads": 4, "vocab": 512,
               "pairs_per_step": 4, "micro_batch": 4, "prompt": 16, "response": 32}
CONFIGS = ("tso_deepspeed", "tso_torch", "tso_torch_compiled", "trl_tuned", "trl_ref_model", "trl_shipped")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps, no 'as shipped' TRL (a smoke run)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--out", help="JSON path (default benchmarks/results/dpo_<shape>.json)")
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)} "
                   "(default: all but tso_torch_compiled)")
    p.add_argument("--minibatches", type=int, default=None, help="K (default 3; quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="E per mini-batch (default 2; quick 1)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="optimizer steps per epoch of a mini-batch")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps at the start (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every configuration")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--shipped-steps", type=int, default=2,
                   help="timed steps of trl_shipped after its warm-up (it is slow on CPU; default 2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs of each configuration, interleaved round-robin (default 3; quick 1; trl_shipped once)")
    p.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON spec)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one configuration (subprocess)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory() -> dict[str, float]:
    import resource

    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _train_config(spec: dict[str, Any]):
    from tso.config import TrainConfig

    return TrainConfig.model_validate({
        "minibatches": spec["K"], "epochs": spec["E"], "global_batch": spec["pairs_per_step"],
        "micro_batch": spec["micro_batch"], "num_workers": 1, "zero_stage": spec["zero_stage"],
        "use_gpu": spec["gpu"], "max_length": spec["max_length"], "seed": 43,
        "loss": {"type": "dpo", "beta": 0.1},
        "optimizer": {"lr": spec["lr"], "betas": (0.9, 0.95), "weight_decay": 0.05, "grad_clip": 1.0,
                      "warmup_ratio": 0.1, "schedule": "cosine"},
    })


def _time_phases(backend) -> dict[str, float]:
    """Wall-clock timers around the step's phases (CPU: no synchronisation needed): the micro-batch forward
    (decoder, log-probs, loss), the LM-head log-probs alone (inside the forward), backward, and the engine's
    step (the optimizer at the accumulation boundary, and DeepSpeed's gradient bookkeeping)."""
    import tso.method.logprobs as lp
    import tso.train.step as step_mod

    acc = {"forward_s": 0.0, "head_logprobs_forward_s": 0.0, "backward_s": 0.0, "step_s": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t
        return wrapper

    step_mod.micro_batch_loss = timed(step_mod.micro_batch_loss, "forward_s")
    import torch

    original_head = lp.head_token_logps
    timed_head = timed(original_head, "head_logprobs_forward_s")
    # the training forward only (the no-grad reference passes are timed as a whole)
    lp.head_token_logps = lambda *a, **k: (timed_head if torch.is_grad_enabled() else original_head)(*a, **k)
    backend.backward = timed(backend.backward, "backward_s")
    backend.step = timed(backend.step, "step_s")
    return acc


def run_tso(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tso.train.backend import make_backend
    from tso.train.data import read_pairs, tokenize_pairs
    from tso.train.metrics import MetricsLog, read_kind, read_steps
    from tso.train.minibatch import plan_stage, run_minibatch_dpo

    train = _train_config(spec)
    device = torch.device("cuda" if spec["gpu"] else "cpu")
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).to(device)
    pairs, rep = tokenize_pairs(read_pairs(spec["pairs"]), tok, train.max_length)
    assert rep.kept == rep.total, rep.summary()
    plan = plan_stage(len(pairs), train, stage=1)
    if spec.get("compile"):
        from tso.train.stage import compile_decoder

        compile_decoder(model)
    backend = make_backend(spec["engine"], model, train, plan.total_steps, use_gpu=spec["gpu"])
    metrics_path = Path(spec["result"]).with_suffix(".metrics.jsonl")  # one file per run
    metrics_path.unlink(missing_ok=True)
    phases = None if spec["gpu"] else _time_phases(backend)
    _sync()
    t0 = time.perf_counter()
    res = run_minibatch_dpo(backend, pairs, train, pad_id=tok.pad_token_id, stage=1, plan=plan,
                            metrics=MetricsLog(metrics_path), checkpoints=False, log=None)
    _sync()
    total = time.perf_counter() - t0
    steps = read_steps(metrics_path)
    refs = read_kind(metrics_path, "reference")
    w = spec["warmup"]
    window = steps[-1]["time_s"] - steps[w - 1]["time_s"] if w > 0 else steps[-1]["time_s"]
    inside = sum(r["reference_time_s"] for r in refs if (w if w > 0 else -1) <= r["step"] < steps[-1]["step"])
    # wall time of each timed step, end to end (a reference pass between two steps is taken out)
    ref_after = {r["step"]: r["reference_time_s"] for r in refs}
    durations = [cur["time_s"] - prev["time_s"] - ref_after.get(prev["step"], 0.0)
                 for prev, cur in zip(steps, steps[1:])][max(w - 1, 0):]
    if phases is not None:
        phases["reference_s"] = res.reference_time_s
        phases["steps_total_s"] = sum(s_["step_time_s"] for s_ in steps)
        phases["other_in_steps_s"] = phases["steps_total_s"] - phases["forward_s"] - phases["backward_s"] - phases["step_s"]
    return {
        "engine": backend.kind, "compiled": bool(spec.get("compile")),
        "warmup_steps_time_s": sum(s_["step_time_s"] for s_ in steps[:w]), "steps": len(steps),
        "timed_steps": len(steps) - w, "phases_s": phases,
        "timed_tokens": sum(s_["tokens"] for s_ in steps[w:]),
        "mean_tokens_per_pair": sum(p.num_tokens for p in pairs) / len(pairs),
        "window_s": window - inside, "reference_time_s": res.reference_time_s, "reference_passes": len(refs),
        "total_time_s": total, "tokens_per_step": sum(p.num_tokens for p in pairs) / len(pairs) * spec["pairs_per_step"],
        "pairs_per_step": steps[-1]["pairs"],
        "step_times_s": durations,
        "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
        "precision": "deepspeed bf16 (fp32 master)" if spec["gpu"] and spec["engine"] == "deepspeed" else
                     ("bf16 autocast, fp32 weights" if spec["gpu"] else "fp32"),
        "reference": "policy at each mini-batch boundary (hot-swap), no second model",
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_caching()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    rows = [json.loads(line) for line in open(spec["pairs_jsonl"])]
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                      "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                      "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    variant = spec["variant"]
    G, micro = spec["pairs_per_step"], spec["micro_batch"]
    steps_total = spec["steps_total"]
    kwargs: dict[str, Any] = dict(
        output_dir=str(Path(spec["workdir"]) / spec["name"]), per_device_train_batch_size=micro,
        gradient_accumulation_steps=G // micro, learning_rate=spec["lr"], adam_beta1=0.9, adam_beta2=0.95,
        weight_decay=0.05, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=0.1, beta=0.1,
        loss_type=["sigmoid"], max_length=None, num_train_epochs=spec["E"], max_steps=steps_total,
        save_strategy="no", report_to=[], logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0,
        seed=43, use_cpu=not spec["gpu"],
    )
    if variant == "shipped":
        pass  # DPOConfig's own defaults: gradient_checkpointing=True, bf16=True
    else:
        kwargs.update(gradient_checkpointing=False, bf16=spec["gpu"], fp16=False,
                      precompute_ref_log_probs=variant == "tuned")
        if variant == "tuned" and spec["gpu"]:
            kwargs["torch_compile"] = True
    args = DPOConfig(**kwargs)

    timings = {"precompute_s": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):
        _sync()
        t = time.perf_counter()
        out = original(self, *a, **k)
        _sync()
        timings["precompute_s"] += time.perf_counter() - t
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute
    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **k):
            _sync()
            ends.append(time.perf_counter())

    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()])
    batch_tokens: list[int] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch_tokens.append(sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                                for e in examples))
        return collate(examples)

    trainer.data_collator = counting_collator
    _sync()
    t0 = time.perf_counter()
    out = trainer.train()
    total = time.perf_counter() - t0
    w = spec["warmup"]
    window = ends[-1] - (ends[w - 1] if w > 0 else t0)
    # real tokens: the same rows tso trains on, counted from the tokenized dataset (each prompt once per row)
    data = trainer.train_dataset
    per_pair = [2 * len(p) + len(c) + len(r) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"],
                                                                  data["rejected_ids"])]
    accum = G // micro
    step_tokens = [sum(batch_tokens[i * accum:(i + 1) * accum]) for i in range(len(ends))]
    return {
        "variant": variant, "steps": len(ends), "timed_steps": len(ends) - w, "window_s": window,
        "timed_tokens": sum(step_tokens[w:]), "mean_tokens_per_pair": sum(per_pair) / len(per_pair),
        "reference_time_s": timings["precompute_s"], "total_time_s": total,
        "tokens_per_step": sum(per_pair) / len(per_pair) * G, "pairs_per_step": G,
        "train_loss": out.training_loss, "padding_free": "not available for DPO in TRL 1.16 (forced off)",
        "step_times_s": [b - a for a, b in zip(ends, ends[1:])][max(w - 1, 0):],
        "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
        "torch_compile": args.torch_compile, "precompute_ref_log_probs": args.precompute_ref_log_probs,
        "precision": "bf16 autocast, fp32 weights" if args.bf16 else "fp32",
        "reference": "precomputed once (policy at start)" if args.precompute_ref_log_probs else
                     "separate reference model, forward in every step",
    }


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    result = run_tso(spec) if spec["kind"] == "tso" else run_trl(spec)
    result.update(_peak_memory())
    # throughput with each side's reference work amortised over the timed steps (both cover the data once)
    share = result["timed_steps"] / result["steps"] if result["steps"] else 0
    busy = result["window_s"] + result["reference_time_s"] * share
    pairs = result["timed_steps"] * result["pairs_per_step"]
    result["pairs_per_s"] = pairs / busy
    result["pairs_per_s_steps_only"] = pairs / result["window_s"]
    result["tokens_per_s"] = result["timed_tokens"] / busy
    result["pairs_per_s_length_normalised"] = result["tokens_per_s"] / result["mean_tokens_per_pair"]
    n = spec["n_params"]
    ref_flops = 2 * n * result["tokens_per_step"] / spec["E"] if spec["kind"] == "tso" or result.get(
        "precompute_ref_log_probs") else 2 * n * result["tokens_per_step"]
    flops_per_step = 6 * n * result["tokens_per_step"] + ref_flops
    result["model_tflops_per_s"] = flops_per_step * result["timed_steps"] / busy / 1e12
    if spec.get("peak_flops"):
        result["mfu"] = result["model_tflops_per_s"] * 1e12 / spec["peak_flops"]
    return result


# ----------------------------------------------------------------------------- driver


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
    return "".join(rng.choice(alphabet) for _ in range(n))


def _length_range(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def max_pair_length(shape: dict[str, Any]) -> int:
    return _length_range(shape["prompt"])[1] + _length_range(shape["response"])[1]


def build_inputs(shape: dict[str, Any], n_pairs: int, workdir: Path, gpu: bool) -> tuple[Path, Path, Path, int]:
    """A random Llama of the shape (saved as an HF dir with the toy byte-level tokenizer) and pairs whose
    prompt and response lengths in tokens are exact (chat-template and EOS tokens included): fixed, or
    drawn uniformly from [lo, hi] per pair (prompt, chosen, rejected) by ``random.Random(0)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tso.io import atomic_write_jsonl, atomic_write_parquet
    from tso.toyworld.tokenizer import build_tokenizer
    from tso.train.data import encode_prompt, encode_response

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=max(shape["vocab"], len(tok)), hidden_size=shape["hidden"],
                      intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape.get("kv_heads", shape["heads"]),
                      max_position_embeddings=max(1024, max_pair_length(shape) + 16),
                      tie_word_embeddings=bool(shape.get("tied", False)), pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model_dir = workdir / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    del model
    rng = random.Random(0)
    prompt_overhead = len(encode_prompt(tok, ""))  # role and generation-prompt tokens
    (plo, phi), (rlo, rhi) = _length_range(shape["prompt"]), _length_range(shape["response"])
    rows = []
    for i in range(n_pairs):
        lp_, lc, lr = rng.randint(plo, phi), rng.randint(rlo, rhi), rng.randint(rlo, rhi)
        rows.append({"id": f"b{i:06d}", "prompt": _random_text(rng, lp_ - prompt_overhead),
                     "chosen": _random_text(rng, lc - 1), "rejected": _random_text(rng, lr - 1)})
        assert len(encode_prompt(tok, rows[-1]["prompt"])) == lp_
        assert len(encode_response(tok, rows[-1]["chosen"])) == lc
    pairs = atomic_write_parquet(workdir / "pairs.parquet", rows)
    return model_dir, pairs, atomic_write_jsonl(workdir / "pairs.jsonl", rows), n_params


def machine_info(gpu: bool) -> dict[str, Any]:
    import importlib.metadata as md

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        info["load_avg_1m_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    for pkg in ("torch", "transformers", "trl", "deepspeed", "accelerate", "datasets"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    if gpu:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_one:
        spec = json.loads(Path(args.run_one).read_text())
        out = run_one(spec)
        Path(spec["result"]).write_text(json.dumps(out))
        return 0

    import torch

    shape = dict(QUICK_SHAPE if args.quick and args.shape == "cpu" else SHAPES[args.shape])
    if args.layers:
        shape["layers"] = args.layers
    gpu = args.shape in GPU_SHAPES
    for key, value in ({} if args.quick else SHAPE_DEFAULTS.get(args.shape, {})).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if gpu and not torch.cuda.is_available():
        print("error: --shape gpu-reference needs a CUDA device", file=sys.stderr)
        return 2
    K = args.minibatches or (2 if args.quick else 3)
    E = args.epochs or (1 if args.quick else 2)
    spe = args.steps_per_epoch or (2 if args.quick else 2)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps_total = K * E * spe
    if warmup >= steps_total:
        print(f"error: warmup ({warmup}) must be below the number of steps ({steps_total})", file=sys.stderr)
        return 2
    G = shape["pairs_per_step"]
    n_pairs = K * spe * G
    configs = args.configs.split(",") if args.configs else [
        c for c in CONFIGS if c != "tso_torch_compiled" and not (args.quick and c == "trl_shipped")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"error: unknown configurations {unknown} (have {list(CONFIGS)})", file=sys.stderr)
        return 2
    out_path = Path(args.out) if args.out else DEFAULT_DIR / f"dpo_{args.shape}.json"
    workdir = Path(tempfile.mkdtemp(prefix="tso-bench-dpo-"))
    model_dir, pairs_parquet, pairs_jsonl, n_params = build_inputs(shape, n_pairs, workdir, gpu)
    peak = None
    if gpu:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    base_spec = {"model_dir": str(model_dir), "pairs": str(pairs_parquet), "pairs_jsonl": str(pairs_jsonl),
                 "workdir": str(workdir), "K": K, "E": E, "pairs_per_step": G, "micro_batch": shape["micro_batch"],
                 "prompt": shape["prompt"], "response": shape["response"], "max_length": max_pair_length(shape) + 8,
                 "warmup": warmup, "steps_total": steps_total,
                 "threads": args.threads, "zero_stage": args.zero_stage, "lr": args.lr, "gpu": gpu,
                 "n_params": n_params, "peak_flops": peak}
    repeats = args.repeats or (1 if args.quick else 3)
    machine = machine_info(gpu)  # before the runs: the load average it records is the starting one
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    print(f"[bench_dpo] shape {args.shape}: {n_params / 1e6:.2f}M params, {G} pairs/step x ({shape['prompt']} + "
          f"{shape['response']}) tokens, K={K} E={E}, {steps_total} steps ({warmup} warm-up), {args.threads} threads",
          flush=True)
    order = [(rep, name) for rep in range(repeats) for name in configs if rep == 0 or name != "trl_shipped"]
    for rep, name in order:
        spec = dict(base_spec, name=name, result=str(workdir / f"{name}.{rep}.json"))
        if name.startswith("tso_"):
            spec.update(kind="tso", engine=name.removeprefix("tso_").removesuffix("_compiled"),
                        compile=name.endswith("_compiled"))
        else:
            spec.update(kind="trl", variant=name.removeprefix("trl_"))
            if name == "trl_shipped" and not args.quick:
                # as shipped is slow on CPU (bf16 + recomputation): warm-up plus two timed steps
                spec.update(steps_total=warmup + args.shipped_steps)
        spec_path = workdir / f"{name}.{rep}.spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
               "TQDM_DISABLE": "1", "HF_DATASETS_CACHE": str(workdir / f"hf_datasets_{name}_{rep}")}
        t = time.perf_counter()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        proc = subprocess.run([sys.executable, __file__, "--run-one", str(spec_path)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            runs[name].append({"error": proc.stderr[-4000:]})
            print(f"[bench_dpo] {name} #{rep + 1}: FAILED ({proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(Path(spec["result"]).read_text())
        r["load_avg_1m_before"] = load
        runs[name].append(r)
        print(f"[bench_dpo] {name} #{rep + 1}: {r['pairs_per_s']:.2f} pairs/s ({r['pairs_per_s_steps_only']:.2f} steps "
              f"only), {r['tokens_per_s']:.0f} tokens/s, peak RSS {r['peak_rss_mib']:.0f} MiB, load {load:.1f} "
              f"[{time.perf_counter() - t:.0f}s]", flush=True)

    results: dict[str, Any] = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            results[name] = {"error": rs[-1]["error"] if rs else "not run"}
            continue
        best = max(ok, key=lambda r: r["pairs_per_s"])
        values = sorted(r["pairs_per_s"] for r in ok)
        pooled = sorted(t for r in ok for t in r.get("step_times_s", []))
        p25 = pooled[len(pooled) // 4] if pooled else None
        results[name] = {**best, "runs": len(ok), "pairs_per_s_all": [r["pairs_per_s"] for r in ok],
                         "step_time_p25_s": p25,
                         "pairs_per_s_p25_steps": best["pairs_per_step"] / p25 if p25 else None,
                         "pairs_per_s_median": values[len(values) // 2] if len(values) % 2 else
                         (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2}

    def ratio(a: str, b: str, key: str = "pairs_per_s") -> float | None:
        ra, rb = results.get(a, {}), results.get(b, {})
        if key in ra and key in rb:
            return ra[key] / rb[key]
        return None

    pairs_of = [(a, b) for a in ("tso_deepspeed", "tso_torch") for b in ("trl_tuned", "trl_ref_model", "trl_shipped")]
    pairs_of += [("tso_deepspeed", "tso_torch"), ("tso_torch_compiled", "tso_torch")]
    ratios = {f"{a}_vs_{b}": ratio(a, b) for a, b in pairs_of if ratio(a, b) is not None}
    ratios_median = {f"{a}_vs_{b}": ratio(a, b, "pairs_per_s_median") for a, b in pairs_of
                     if ratio(a, b, "pairs_per_s_median") is not None}
    ratios_p25 = {f"{a}_vs_{b}": ratio(a, b, "pairs_per_s_p25_steps") for a, b in pairs_of
                  if ratio(a, b, "pairs_per_s_p25_steps") is not None}
    key_norm = "pairs_per_s_length_normalised"
    ratios_norm = {f"{a}_vs_{b}": ratio(a, b, key_norm) for a, b in pairs_of if ratio(a, b, key_norm) is not None}
    mem = {f"{a}_vs_{b}": results[a]["peak_rss_mib"] / results[b]["peak_rss_mib"]
           for a, b in pairs_of if "peak_rss_mib" in results.get(a, {}) and "peak_rss_mib" in results.get(b, {})}
    report = {
        "benchmark": "dpo_training_throughput",
        "mode": "quick" if args.quick else "full",
        "shape": {"name": args.shape + (" (quick: reduced)" if args.quick and args.shape == "cpu" else ""), **shape,
                  "n_params": n_params},
        "settings": {"minibatches": K, "epochs": E, "steps_per_epoch": spe, "steps": steps_total,
                     "warmup_steps": warmup, "pairs": n_pairs, "threads": args.threads, "zero_stage": args.zero_stage,
                     "lr": args.lr, "loss": "dpo (sigmoid), beta 0.1", "repeats": repeats,
                     "processes": "one per run, 1 worker each, configurations interleaved round-robin",
                     "lengths": {"prompt": shape["prompt"], "response": shape["response"],
                                 "distribution": "fixed" if isinstance(shape["prompt"], int) else
                                 "uniform integers in [lo, hi] (inclusive), drawn per pair for the prompt, the "
                                 "chosen and the rejected answer (in that order) from random.Random(0); tokens "
                                 "include the chat template and the EOS"},
                     "trl_shipped_timed_steps": args.shipped_steps},
        "machine": {**machine, "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "baseline": "trl_tuned",
        "configurations": results,
        "ratios": ratios,
        "ratios_median": ratios_median,
        "ratios_p25_steps": ratios_p25,
        "ratios_length_normalised": ratios_norm,
        "peak_rss_ratios": mem,
        "notes": [
            "Each configuration's numbers are its best run (highest pairs/s) of `repeats` interleaved runs: on a "
            "shared machine the best run is the one least slowed by other load; ratios_median uses the medians.",
            "pairs_per_s_p25_steps / ratios_p25_steps: pairs per step over the 25th percentile of all timed "
            "steps' wall times pooled over the runs (the steps least slowed by other load; reference passes excluded, "
            "steps only): the steadiest comparison on a busy shared machine.",
            "pairs_per_s amortises each side's reference work over the timed steps: tso's K boundary passes, "
            "TRL's precompute pass (trl_ref_model runs a reference forward inside every step instead).",
            "trl_tuned: gradient checkpointing off, precompute_ref_log_probs on; torch_compile on GPU only.",
            "trl_shipped (full mode only): DPOConfig defaults, gradient checkpointing on and bf16 autocast (what "
            "bf16=True means on CPU), timed over settings.trl_shipped_timed_steps steps after warm-up; changed from "
            "the defaults only where every configuration is: optimizer/schedule settings, use_cpu, max_length=None "
            "(no truncation), no saving/logging.",
            "pairs_per_s_length_normalised / ratios_length_normalised: real tokens per second over the data set's "
            "mean tokens per pair; with variable lengths a configuration timed over a few steps (trl_shipped) "
            "draws a sample of pair lengths of its own, and this figure corrects for it.",
            "tso packs each micro-batch's rows padding-free (position ids restart per sequence, block-diagonal "
            "causal attention; no padding in the linear layers), groups a step's micro-batches by length, "
            "and computes log-probs with a chunked LM head (no full [tokens, vocab] fp32 logits); TRL 1.16 "
            "pads chosen and rejected rows to one length (its padding_free is forced off for DPO) and computes "
            "per-token log-probs with its own fused LM head (plus entropy, mean-logit and top-1 statistics).",
            "phases_s (tso, CPU): forward_s = micro-batch forward incl. log-probs and loss; "
            "head_logprobs_forward_s = the LM-head log-probs inside it; backward_s; step_s = the engine's step "
            "(optimizer at the accumulation boundary; DeepSpeed's gradient reduction/bookkeeping); reference_s.",
            "On CPU the comparison is evidence, not a gate (docs/benchmarks.md); the machine may be shared: "
            "see machine.load_avg_1m_at_start.",
        ],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out_path)
    print(f"[bench_dpo] ratios (best runs): {json.dumps({k: round(v, 3) for k, v in ratios.items()})}")
    print(f"[bench_dpo] ratios (p25 step times): {json.dumps({k: round(v, 3) for k, v in ratios_p25.items()})}")
    print(f"[bench_dpo] wrote {out_path}")
    failed = [k for k, v in results.items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
