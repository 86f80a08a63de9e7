"""`tso report RUN_DIR`: a Markdown report with paper-style tables and the training plots.

It reads only what the run wrote (eval/*.json, stage-*/pairs/summary.json, stage-*/train/metrics.jsonl
and plots), so it can be regenerated at any time, also for a partial run.
"""

from __future__ import annotations

import json
from pathlib import Path

from tso.io import atomic_write_text


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


def model_table(evals: list[dict]) -> str:
    rows = [
        "| model | verifier mean ± s.e. (ground truth) | judge mean ± s.e. | win rate vs base (verifier) "
        "| judge unscored | prompts |",
        "|---|---|---|---|---|---|",
    ]
    for e in sorted(evals, key=lambda e: _model_order(e["label"])):
        rows.append(
            f"| {e['label']} | {_pm(e.get('verifier_mean'), e.get('verifier_se'))} | "
            f"{_pm(e.get('judge_mean'), e.get('judge_se'))} | "
            f"{_fmt(e.get('win_rate_vs_base'))} | {_fmt(e.get('judge_unscored', 0))} | {e.get('n', '-')} |"
        )
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
    for offset, key, color in ((-0.2, "verifier", "tab:green"), (0.2, "judge", "tab:blue")):
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
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_path)
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


def stage_table(run_dir: Path) -> str:
    rows = [
        "| run | pairs | kinds | rejected rows | unscored judge answers | final loss | reward chosen | reward rejected |"
        " accuracy | steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    stage_dirs = sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / "pairs").exists())
    stage_dirs += sorted(p for p in run_dir.glob("baselines/*/*") if p.is_dir() and (p / "pairs").exists())
    for d in stage_dirs:
        s = _load_json(d / "pairs" / "summary.json") or {}
        m = _last_metrics(d / "train" / "metrics.jsonl") or {}
        kinds = ", ".join(f"{k} {v}" for k, v in sorted((s.get("pair_kinds") or {}).items()))
        unscored = sum((s.get("unscored_judge_answers") or {}).values())
        rows.append(
            f"| {d.relative_to(run_dir).as_posix()} | {s.get('pairs', '-')} | {kinds or '-'} | "
            f"{s.get('rejected_rows', '-')} | {unscored} | "
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
        parts += [
            "Answers sampled with the evaluation decoding settings; the verifier is the toy world's ground "
            "truth on the 2..10 scale, the judge is the corrected judge of stage 0.",
            "",
            model_table(evals),
            "",
        ]
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
    else:
        parts += ["No evaluation results yet.", ""]
    parts += ["## Stages", "", stage_table(run_dir), ""]
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
    """States, not asserts, whether the paper's expected shape held (TSO-1 < TSO-2 < ... and above base/DPO)."""
    by = {e["label"]: e.get("verifier_mean") for e in evals}
    tso = [by[k] for k in sorted((k for k in by if k.startswith("tso-")), key=lambda k: int(k.split("-")[1]))]
    lines = []
    if len(tso) >= 2 and None not in tso:
        rising = all(a < b for a, b in zip(tso, tso[1:]))
        shown = ", ".join(_fmt(t, 3) for t in tso)
        lines.append(f"TSO stages rise monotonically on ground truth: **{'yes' if rising else 'no'}** ({shown}).")
    if tso and tso[-1] is not None:
        for ref in ("base", "dpo"):
            if by.get(ref) is not None:
                lines.append(f"Last TSO stage above {ref}: **{'yes' if tso[-1] > by[ref] else 'no'}** "
                             f"({_fmt(tso[-1], 3)} vs {_fmt(by[ref], 3)}).")
    return " ".join(lines)
