"""`tso train`, `tso train-judge`, `tso plot`: thin argument parsing over tso.train."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tso.commands import add_set_argument
from tso.io import RunDirLocked, lock_if_under
from tso.models.checkpoint import absolute_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one stage: mini-batch iterative DPO with the reference hot-swap")
    p.add_argument("config", help="run config YAML")
    p.add_argument("--pairs", help="pairs Parquet file (id, prompt, chosen, rejected); required unless --plan")
    p.add_argument("--out", help="output directory (default <run_dir>/stage-<N>/train, as tso run)")
    p.add_argument("--base", help="model to start from (default: the matrix's base entry)")
    p.add_argument("--stage", type=int, default=1, help="stage number (seeds, lineage); default 1")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (one worker)")
    p.add_argument("--backend", "--engine", dest="backend", choices=["deepspeed", "torch"], default="deepspeed",
                   help="how the step runs: a DeepSpeed engine (default) or plain PyTorch")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures Ray Train recovers from")
    p.add_argument("--plan", action="store_true",
                   help="print the memory per device and the steps of the stage, and train nothing (reads only "
                        "the model's config.json; no weights, no pairs file needed)")
    p.add_argument("--num-pairs", type=int, default=10000,
                   help="--plan: pairs in the stage when no --pairs file is given (default 10000)")
    p.add_argument("--gpus-per-node", type=int, help="--plan: devices per node (default min(train.num_workers, 8))")
    p.add_argument("--device-memory-gib", type=float, default=80.0, help="--plan: memory of one device (default 80)")
    p.add_argument("--json", action="store_true", help="--plan: print the plan as JSON")
    add_set_argument(p)
    p.set_defaults(func=_train)

    j = sub.add_parser("train-judge", help="fine-tune the base into the judge on feedback examples")
    j.add_argument("config", help="run config YAML")
    j.add_argument("--feedback", help="feedback JSONL (default judge.feedback)")
    j.add_argument("--out", help="judge model directory (default judge.path or <run_dir>/judge)")
    j.add_argument("--base", help="model to fine-tune (default: the matrix's base entry)")
    j.add_argument("--local", action="store_true", help="run in this process without Ray (one worker)")
    j.add_argument("--backend", "--engine", dest="backend", choices=["deepspeed", "torch"], default="deepspeed")
    j.add_argument("--max-failures", type=int, default=2)
    add_set_argument(j)
    j.set_defaults(func=_train_judge)

    pl = sub.add_parser("plot", help="draw rewards, margin and gradient scale from a training metrics JSONL")
    pl.add_argument("metrics", help="metrics.jsonl written by `tso train`")
    pl.add_argument("--out", help="PNG path (default: next to the metrics file)")
    pl.set_defaults(func=_plot)


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _train(args) -> int:
    from tso.config import load_config_ref
    from tso.train.ray_trainer import base_model_path, base_options, default_policy_out, preflight_policy, train_policy
    from tso.train.stage import PolicyJob, train_policy_local

    cfg, _ = load_config_ref(args.config, args.set)
    if args.plan:
        return _plan(cfg, args)
    if not args.pairs:
        return _fail(ValueError("--pairs is required (only --plan trains nothing and needs none)"))
    try:
        from tso.train.stage import check_model_settings

        check_model_settings(cfg.train, args.backend)  # flash-attn, peft: before any worker starts
        out = Path(args.out or default_policy_out(cfg, args.stage)).absolute()
        with lock_if_under(out, cfg.run_dir, f"tso train --stage {args.stage} ({out})"):
            if args.local:
                base, name = (args.base, None) if args.base else base_model_path(cfg)
                preflight_policy(cfg.train, args.pairs, base, args.stage, base_options(cfg))
                job = PolicyJob(train=cfg.train.model_dump(mode="json"), pairs_path=str(Path(args.pairs).absolute()),
                                base_path=absolute_checkpoint(base), out_dir=str(out), stage=args.stage,
                                base_name=name, config_hash=cfg.config_hash(), backend=args.backend,
                                options=base_options(cfg))
                result = train_policy_local(job)
            else:
                result = train_policy(cfg, args.pairs, args.base, out, args.stage, backend=args.backend,
                                      max_failures=args.max_failures)
    except (FileNotFoundError, ValueError, RunDirLocked) as e:
        return _fail(e)
    s = result.summary
    print(f"policy:  {result.policy_dir}")
    print(f"metrics: {result.metrics_path}")
    print(f"plot:    {result.plot_path}")
    print(f"{s['steps']} steps, {s['pairs_trained']} pairs trained, {s['pairs_per_s']:.1f} pairs/s "
          f"(reference passes included), {len(s['tokenize']['too_long'])} pairs too long left out")
    return 0


def _plan(cfg, args) -> int:
    """``tso train CONFIG --plan``: the sizing of tso.train.plan, printed; nothing is trained or written."""
    import json

    from tso.train.plan import count_pairs, format_plan, make_plan, read_model_config
    from tso.train.ray_trainer import base_model_path, base_options

    try:
        base = args.base or base_model_path(cfg)[0]
        num_pairs = count_pairs(args.pairs) if args.pairs else args.num_pairs
        plan = make_plan(cfg.train, read_model_config(base, base_options(cfg)), num_pairs, args.gpus_per_node,
                         args.device_memory_gib, args.stage)
    except (FileNotFoundError, ValueError) as e:
        return _fail(e)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _train_judge(args) -> int:
    from tso.config import load_config_ref
    from tso.train.judge_sft import JudgeJob, judge_train_config, train_judge_local
    from tso.train.ray_trainer import base_model_path, base_options, default_judge_out, train_judge

    cfg, _ = load_config_ref(args.config, args.set)
    try:
        from tso.train.stage import check_model_settings

        check_model_settings(judge_train_config(cfg), args.backend)
        out = Path(args.out or default_judge_out(cfg)).absolute()
        with lock_if_under(out, cfg.run_dir, f"tso train-judge ({out})"):
            if args.local:
                feedback = args.feedback or cfg.judge.feedback
                if not feedback:
                    raise ValueError("no feedback file: pass --feedback or set judge.feedback in the config")
                base, name = (args.base, None) if args.base else base_model_path(cfg)
                job = JudgeJob(train=judge_train_config(cfg).model_dump(mode="json"),
                               feedback_path=str(Path(feedback).absolute()), base_path=absolute_checkpoint(base),
                               out_dir=str(out), work_dir=str(out.with_name(out.name + "_train")),
                               config_hash=cfg.config_hash(), base_name=name,
                               max_examples=cfg.judge.train.max_examples, backend=args.backend,
                               options=base_options(cfg))
                summary = train_judge_local(job)
            else:
                summary = train_judge(cfg, args.feedback, out, args.base, backend=args.backend,
                                      max_failures=args.max_failures)
    except (FileNotFoundError, ValueError, RunDirLocked) as e:
        return _fail(e)
    print(f"judge:   {summary['judge_dir']}")
    print(f"metrics: {summary['metrics']}")
    print(f"loss:    {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} over {summary['steps']} steps")
    return 0


def _plot(args) -> int:
    from tso.train.plots import plot_training

    try:
        path = plot_training(args.metrics, args.out)
    except (FileNotFoundError, ValueError) as e:
        return _fail(e)
    print(path)
    return 0
