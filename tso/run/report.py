"""`tso report RUN_DIR`: a Markdown report with paper-style tables and the training plots.

It reads only what the run wrote (eval/*.json, stage-*/pairs/summary.json, stage-*/train/metrics.jsonl
and plots), so it can be regenerated at any time, also for a partial run.
"""

from __future__ import annotations

import json
from pathlib import Path

from tso.io import atomic_file, atomic_write_json, atomic_write_text


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _model_order(label: str) -> tuple:
    if label == "base":
        return (0, 0, label)
    if label.startswith("tso-"):
        return (2, int(label.split("-")[1]), label)
    return (1, 0, label)


def _pm(mean, se) -> str:
    return _fmt(mean) if se is None or mean is None else f"{_fmt(mean)} ± {_fmt(se)}"


def has_verifier(evals: list[dict]) -> bool:
    return any(e.get("verifier") or e.get("verifier_mean") is not None for e in evals)


def model_table(evals: list[dict]) -> str:
    """One row per model; the verifier columns only when a verifier scored the answers."""
    truth = has_verifier(evals)
    key = "verifier" if truth else "judge"
    columns = (["verifier mean ± s.e. (ground truth)"] if truth else []) + [
        "judge mean ± s.e.", f"win rate vs base ({key})", "judge parse rate", "truncated", "prompts"]
    rows = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for e in sorted(evals, key=lambda e: _model_order(e["label"])):
        cells = [_pm(e.get("verifier_mean"), e.get("verifier_se"))] if truth else []
        cells += [_pm(e.get("judge_mean"), e.get("judge_se")), _fmt(e.get("win_rate_vs_base")),
                  _fmt(e.get("judge_parse_rate")), _fmt(e.get("truncation_rate")), str(e.get("n", "-"))]
        rows.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def judge_text(meta: dict, evals: list[dict]) -> str:
    """What the judge is and what the scores are (no claim of ground truth without a verifier)."""
    judge = meta.get("judge") or {}
    parts = []
    if judge:
        parts.append(f"The judge is {judge.get('description', judge.get('kind'))} at `{judge.get('path')}`.")
    if has_verifier(evals):
        parts.append(f"The verifier (`{meta.get('verifier', 'configured')}`) gives the ground truth on the 2..10 "
                     "scale; win rates compare its scores of each model's and the base's answers to the same prompt.")
    else:
        parts.append("No verifier is configured (`eval.verifier: none`): every score here is the judge's, not ground "
                     "truth. Win rates compare the judge's scores of each model's and the base's answers to the same "
                     "prompt (ties count half; prompts where either answer is unscored are left out).")
    parts.append("Answers are sampled with the evaluation decoding settings; *truncated* is the share of answers "
                 "cut by `max_new_tokens` or the context.")
    return " ".join(parts)


def judge_table(run_dir: Path, evals: list[dict]) -> str:
    """How often the judge's answers held a score, per step that used it."""
    rows = ["| where | answers judged | parse rate | unscored reasons |", "|---|---|---|---|"]
    for d in _stage_dirs(run_dir):
        s = _load_json(d / "pairs" / "summary.json") or {}
        j = s.get("judge") or {}
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((s.get("unscored_judge_answers") or {}).items()))
        rows.append(f"| pairs {d.relative_to(run_dir).as_posix()} | {j.get('judged', '-')} | "
                    f"{_fmt(j.get('parse_rate'))} | {reasons or '-'} |")
    for e in sorted(evals, key=lambda e: _model_order(e["label"])):
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((e.get("judge_unscored_reasons") or {}).items()))
        rows.append(f"| eval {e['label']} | {e.get('answered', e.get('n', '-'))} | {_fmt(e.get('judge_parse_rate'))} | "
                    f"{reasons or '-'} |")
    return "\n".join(rows)


def judge_quality_table(q: dict) -> str:
    """The run's judge beside the uncorrected base and the length-only floor, on held-out feedback."""
    dims = q.get("dimensions") or []
    head = ["predictor", "parse rate", "Spearman"] + [f"Spearman {d}" for d in dims] + ["within 1 point", "MAE"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in (("the run's judge", q["judge"]), ("uncorrected base", q["base"]),
                     (f"length only ({q['length_only'].get('direction') or '-'})", q["length_only"])):
        per = r.get("spearman_per_dimension") or {}
        cells = [label, _fmt(r.get("parse_rate")), _fmt(r.get("spearman"))] + [_fmt(per.get(d)) for d in dims]
        cells += [_fmt(r.get("within_1")), _fmt(r.get("mae"))]
        rows.append("| " + " | ".join(cells) + " |")
    checks = ", ".join(f"{k}: {'yes' if ok else 'no'}" for k, ok in q["rule"]["checks"].items())
    verdict = "holds" if q["rule"]["holds"] else "does not hold"
    return (f"Judge quality on {q['records']} held-out feedback records (`{q['held_out']}`), greedy answers; "
            f"Spearman with the target scores (length only: in its better direction, so the floor is as high "
            f"as length can make it):\n\n" + "\n".join(rows) +
            f"\n\nThe rule for a corrected judge ({checks}) {verdict}.")


def read_eval_records(run_dir: Path) -> dict[str, list[dict]]:
    """Each evaluated model's per-prompt records (``eval/<label>.answers.jsonl``)."""
    out = {}
    for path in sorted((run_dir / "eval").glob("*.answers.jsonl")):
        out[path.name.removesuffix(".answers.jsonl")] = [json.loads(line) for line in path.read_text().splitlines()
                                                         if line.strip()]
    return out


def verdicts_table(result: dict) -> str:
    rows = ["| claim | mean difference | 95% interval | prompts | verdict |", "|---|---|---|---|---|"]
    for c in result["claims"]:
        interval = "-" if c["low"] is None else f"[{c['low']:+.3f}, {c['high']:+.3f}]"
        mean = "-" if c["mean"] is None else f"{c['mean']:+.3f}"
        rows.append(f"| {c['claim']} | {mean} | {interval} | {c['n']} | **{c['verdict']}** |")
    return "\n".join(rows)


def plot_models(evals: list[dict], out_path: Path) -> Path | None:
    """Bar chart of each model's held-out means with standard errors (verifier and judge side by side)."""
    evals = sorted(evals, key=lambda e: _model_order(e["label"]))
    if not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [e["label"] for e in evals]
    x = list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 4))
    keys = ((-0.2, "verifier", "tab:green"), (0.2, "judge", "tab:blue")) if has_verifier(evals) else ((0.0, "judge", "tab:blue"),)
    for offset, key, color in keys:
        means = [e.get(f"{key}_mean") for e in evals]
        if all(m is None for m in means):
            continue
        ax.bar([i + offset for i in x], [m if m is not None else float("nan") for m in means], width=0.4,
               yerr=[e.get(f"{key}_se") or 0.0 for e in evals], capsize=3, color=color,
               label=f"{key} mean" + (" (ground truth)" if key == "verifier" else ""))
    ax.set_xticks(x, labels)
    ax.set_ylabel("score (2..10)")
    ax.set_title("held-out evaluation (error bars: standard error)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_file(out_path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out_path


def _per_model_table(evals: list[dict], key: str, columns: list[str]) -> str:
    """One row per model of the ``{column: value}`` dict each evaluation holds under ``key``."""
    if not columns:
        return ""
    rows = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for e in sorted(evals, key=lambda e: _model_order(e["label"])):
        values = e.get(key) or {}
        rows.append(f"| {e['label']} | " + " | ".join(_fmt(values.get(c)) for c in columns) + " |")
    return "\n".join(rows)


def family_table(evals: list[dict]) -> str:
    return _per_model_table(evals, "per_family", sorted({f for e in evals for f in (e.get("per_family") or {})}))


def dimension_table(evals: list[dict]) -> str:
    """Ground truth per rubric dimension (correctness, conciseness): what moved the overall score."""
    dims = list(dict.fromkeys(d for e in evals for d in (e.get("verifier_dimensions") or {})))
    return _per_model_table(evals, "verifier_dimensions", dims)


def _last_metrics(path: Path) -> dict | None:
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
        if record.get("kind", "step") == "step":
            last = record
    return last


def _stage_dirs(run_dir: Path) -> list[Path]:
    stage_dirs = sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / "pairs").exists())
    return stage_dirs + sorted(p for p in run_dir.glob("baselines/*/*") if p.is_dir() and (p / "pairs").exists())


def stage_table(run_dir: Path) -> str:
    rows = [
        "| run | pairs | kinds | rejected rows | truncated answers | unscored judge answers | final loss | reward chosen "
        "| reward rejected | accuracy | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in _stage_dirs(run_dir):
        s = _load_json(d / "pairs" / "summary.json") or {}
        m = _last_metrics(d / "train" / "metrics.jsonl") or {}
        kinds = ", ".join(f"{k} {v}" for k, v in sorted((s.get("pair_kinds") or {}).items()))
        unscored = sum((s.get("unscored_judge_answers") or {}).values())
        truncated = sum((s.get("truncated") or {}).values())
        rows.append(
            f"| {d.relative_to(run_dir).as_posix()} | {s.get('pairs', '-')} | {kinds or '-'} | "
            f"{s.get('rejected_rows', '-')} | {truncated} ({s.get('truncated_action', 'drop')}) | {unscored} | "
            f"{_fmt(m.get('loss'), 4)} | {_fmt(m.get('reward_chosen'), 3)} | {_fmt(m.get('reward_rejected'), 3)} | "
            f"{_fmt(m.get('accuracy'))} | {m.get('step', '-')} |"
        )
    return "\n".join(rows)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    evals = [e for e in (_load_json(p) for p in sorted((run_dir / "eval").glob("*.json"))) if e and "label" in e]
    meta = _load_json(run_dir / "run.json") or {}
    parts = [f"# TSO run report: {meta.get('name', run_dir.name)}", ""]
    if meta:
        parts += [
            f"Config hash `{meta.get('config_hash', '-')}`, seed {meta.get('seed', '-')}, "
            f"{meta.get('stages', '-')} stages, loss `{meta.get('loss', '-')}`.",
            "",
        ]
    parts += ["## Held-out evaluation", ""]
    if evals:
        parts += [judge_text(meta, evals), "", model_table(evals), ""]
        chart = plot_models(evals, run_dir / "eval.png")
        if chart:
            parts += [f"![held-out evaluation]({chart.name})", ""]
        dim = dimension_table(evals)
        if dim:
            parts += ["Verifier mean per rubric dimension (2..10):", "", dim, ""]
        fam = family_table(evals)
        if fam:
            parts += ["Verifier mean per task family:", "", fam, ""]
        parts += [_verdict(evals), ""]
        from tso.run.verdicts import claims_from_records

        result = claims_from_records(read_eval_records(run_dir))
        if result["claims"]:
            atomic_write_json(run_dir / "verdicts.json", result)
            parts += ["### Verdicts", "",
                      f"Each claim compares two models' {result['score']} scores prompt by prompt: the mean "
                      "difference and its 95% t-interval over the evaluation prompts. *holds*: the interval "
                      "excludes 0 in the claimed direction; *contradicted*: it excludes 0 the other way; else "
                      "*inconclusive*. One training run: the interval covers the prompts and the sampled answers, "
                      "not the spread between runs with other seeds.", "", verdicts_table(result), ""]
    else:
        parts += ["No evaluation results yet.", ""]
    parts += ["## Stages", "", stage_table(run_dir), ""]
    parts += ["## The judge", ""]
    quality = _load_json(run_dir / "judge_quality.json")
    if quality and "rule" in quality:
        parts += [judge_quality_table(quality), ""]
    parts += [judge_table(run_dir, evals), ""]
    plots = sorted(run_dir.glob("*/train/*.png")) + sorted(run_dir.glob("baselines/*/*/train/*.png"))
    if plots:
        parts += ["## Training curves", ""]
        for p in plots:
            rel = p.relative_to(run_dir)
            parts += [f"### {rel.parent.parent.as_posix()}", "", f"![{rel}]({rel.as_posix()})", ""]
    timings = meta.get("timings")
    if timings:
        parts += ["## Time per phase", "", "| phase | seconds |", "|---|---|"]
        parts += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
        parts.append("")
    return atomic_write_text(run_dir / "report.md", "\n".join(parts))


def _verdict(evals: list[dict]) -> str:
    """States, not asserts, whether the paper's expected shape held (TSO-1 < TSO-2 < ... and above base/DPO),
    on the verifier when there is one, else on the judge's scores (and says which)."""
    key, on = ("verifier_mean", "on ground truth") if has_verifier(evals) else ("judge_mean", "by the judge's scores")
    by = {e["label"]: e.get(key) for e in evals}
    tso = [by[k] for k in sorted((k for k in by if k.startswith("tso-")), key=lambda k: int(k.split("-")[1]))]
    lines = []
    if len(tso) >= 2 and None not in tso:
        rising = all(a < b for a, b in zip(tso, tso[1:]))
        shown = ", ".join(_fmt(t, 3) for t in tso)
        lines.append(f"TSO stages rise monotonically {on}: **{'yes' if rising else 'no'}** ({shown}).")
    if tso and tso[-1] is not None:
        for ref in ("base", "dpo"):
            if by.get(ref) is not None:
                lines.append(f"Last TSO stage above {ref} {on}: **{'yes' if tso[-1] > by[ref] else 'no'}** "
                             f"({_fmt(tso[-1], 3)} vs {_fmt(by[ref], 3)}).")
    return " ".join(lines)
