"""Done-markers a resume trusts only when they parse and agree with their artifacts, and a run directory
of another config refused before anything in it is written. Real files, a real tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.toydata import arithmetic_pairs, write_pairs
from tso.io import LOCK_FILE, atomic_write_json
from tso.run.markers import judge_done, pairs_done, read_json_marker, training_done

pytestmark = pytest.mark.timeout(120)


def _pairs_step(out: Path, n: int = 5, counted: int | None = None) -> Path:
    write_pairs(arithmetic_pairs(n), out / "pairs.parquet")
    atomic_write_json(out / "summary.json", {"pairs": n if counted is None else counted, "prompts": n})
    return out


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# ----------------------------------------------------------------------------- read_json_marker


def test_a_good_marker_is_read(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"pairs": 3, "kinds": {"a": 1}})
    assert read_json_marker(tmp_path / "m.json", ("pairs",)) == {"pairs": 3, "kinds": {"a": 1}}


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("  \n", "empty"),
    ('{"pairs": 3, "kin', "not valid JSON"),
    ('[1, 2]', "a JSON list, not an object"),
    ('{"prompts": 3}', "lacks pairs"),
])
def test_a_bad_marker_is_not_trusted_and_says_why(tmp_path, capsys, text, why):
    (tmp_path / "m.json").write_text(text)
    assert read_json_marker(tmp_path / "m.json", ("pairs",)) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and f"{tmp_path / 'm.json'}: not trusted as a done-marker ({why}" in out[0], out


def test_a_missing_marker_is_simply_not_done(tmp_path, capsys):
    assert read_json_marker(tmp_path / "none.json") is None and capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- the steps


def test_pairs_done_only_when_the_summary_counts_the_parquet_rows(tmp_path, capsys):
    assert pairs_done(_pairs_step(tmp_path / "good"))
    assert not pairs_done(_pairs_step(tmp_path / "mismatch", n=5, counted=7))
    assert "it counts 7 pairs, pairs.parquet holds 5 rows" in capsys.readouterr().out

    truncated = _pairs_step(tmp_path / "truncated")
    _cut(truncated / "summary.json", 9)
    assert not pairs_done(truncated)
    empty = _pairs_step(tmp_path / "empty")
    (empty / "summary.json").write_text("")
    assert not pairs_done(empty)

    cut_parquet = _pairs_step(tmp_path / "cut_parquet")
    _cut(cut_parquet / "pairs.parquet", 100)
    assert not pairs_done(cut_parquet)
    assert "pairs.parquet: not trusted as a done-marker (unreadable Parquet" in capsys.readouterr().out
    no_parquet = _pairs_step(tmp_path / "no_parquet")
    (no_parquet / "pairs.parquet").unlink()
    assert not pairs_done(no_parquet) and "pairs.parquet is missing" in capsys.readouterr().out
    assert not pairs_done(tmp_path / "never_ran")


def _training_step(out: Path, model: Path) -> Path:
    shutil.copytree(model, out / "policy")
    atomic_write_json(out / "policy" / "lineage.json", {"kind": "policy", "stage": 1})
    atomic_write_json(out / "summary.json", {"policy_dir": str(out / "policy"), "steps": 4})
    return out


def test_training_done_needs_lineage_summary_and_weights(tmp_path, tiny_model_dir, capsys):
    assert training_done(_training_step(tmp_path / "good", tiny_model_dir))
    cut = _training_step(tmp_path / "cut", tiny_model_dir)
    _cut(cut / "summary.json", 12)
    assert not training_done(cut)
    lineage = _training_step(tmp_path / "lineage", tiny_model_dir)
    (lineage / "policy" / "lineage.json").write_text("")
    assert not training_done(lineage)
    capsys.readouterr()
    weights = _training_step(tmp_path / "weights", tiny_model_dir)
    (weights / "policy" / "model.safetensors").unlink()
    assert not training_done(weights) and "no weights file in" in capsys.readouterr().out


def test_judge_done_needs_its_config_weights_and_training_summary(tmp_path, tiny_model_dir):
    judge, work = tmp_path / "judge", tmp_path / "judge_train"
    shutil.copytree(tiny_model_dir, judge)
    assert not judge_done(judge, work)  # no training summary: not done
    atomic_write_json(work / "summary.json", {"judge_dir": str(judge), "steps": 9})
    assert judge_done(judge, work)
    _cut(judge / "config.json", 20)
    assert not judge_done(judge, work)


# ----------------------------------------------------------------------------- the run directory


def _cfg(tmp_path: Path, model: Path):
    from tso.config import parse_config

    models = [{"name": "base", "path": str(model), "version": 1, "size": 1},
              {"name": "old", "path": str(model), "version": 0, "size": 1}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "1", "prompt": "1+1="}) + "\n")
    return parse_config({"name": "refused", "run_dir": str(tmp_path / "run"), "matrix": {"base": "base", "models": models},
                         "pairs": {"prompts": str(prompts)}})


def test_a_run_dir_of_another_config_is_refused_before_any_write(tmp_path, tiny_model_dir):
    import ray

    from tso.run.pipeline import run_pipeline

    cfg = _cfg(tmp_path, tiny_model_dir)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir()
    (run_dir / "config.yaml").write_bytes(b"name: other\n# the config this run_dir was made with\n")
    (run_dir / "run.json").write_text(json.dumps({"name": "other", "config_hash": "0123456789abcdef"}))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    ray_was_up = ray.is_initialized()
    with pytest.raises(RuntimeError, match=r"holds a run of another config \(hash 0123456789abcdef != "):
        run_pipeline(cfg, "refused.yaml")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # byte-identical, no lock left behind
    assert ray.is_initialized() == ray_was_up  # refused before connecting to Ray

    (run_dir / "run.json").write_text('{"name": "other", "config_')  # cut short: which config is unknown
    with pytest.raises(RuntimeError, match="run.json is unreadable.*delete run.json to resume"):
        run_pipeline(cfg, "refused.yaml")
    assert (run_dir / "config.yaml").read_bytes() == before["config.yaml"] and not (run_dir / LOCK_FILE).exists()
