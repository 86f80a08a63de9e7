"""Stage bookkeeping without a cluster: a trained policy joining the matrix, and baselines that differ
from the main run only by their method."""

from __future__ import annotations

import copy

import pytest
import yaml

from tso.config import load_config_ref
from tso.run.pipeline import baseline_config, register_policy, settle_judge

MATRIX = {
    "base": "v2-m",
    "models": [
        {"name": "v1-s", "path": "/m/v1-s", "version": 1, "size": 1.0, "weight": 0.25},
        {"name": "v1-m", "path": "/m/v1-m", "version": 1, "size": 2.0, "weight": 0.75},
        {"name": "v2-m", "path": "/m/v2-m", "version": 2, "size": 2.0, "chat_template": "{{ messages }}",
         "stop_tokens": ["<eot>"], "revision": "abc"},
        {"name": "v2-l", "path": "/m/v2-l", "version": 2, "size": 4.0},
    ],
}


def _cfg(tmp_path, sets=(), matrix=None, **extra):
    data = {"name": "main", "run_dir": str(tmp_path / "run"), "matrix": copy.deepcopy(matrix or MATRIX),
            "pairs": {"prompts": "/data/p.jsonl"}, "eval": {"prompts": "/data/e.jsonl"}, **extra}
    path = tmp_path / "main.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config_ref(str(path), list(sets))[0]


def test_explicit_negative_weights_keep_working_from_stage_two(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.mixtures().gamma == {"v1-s": 0.25, "v1-m": 0.75}
    s2 = register_policy(cfg, 1, "/runs/tso-1")
    # the demoted base takes an equal share (1/3); the others keep their proportions
    assert s2.matrix.base == "tso-1"
    assert s2.mixtures().gamma == pytest.approx({"v1-s": 0.25 * 2 / 3, "v1-m": 0.75 * 2 / 3, "v2-m": 1 / 3})
    assert s2.mixtures().alpha == cfg.mixtures().alpha
    new = s2.matrix.entry("tso-1")
    assert (new.version, new.size, new.chat_template, new.stop_tokens, new.revision) == (3, 2.0, "{{ messages }}",
                                                                                           ["<eot>"], None)
    s3 = register_policy(s2, 2, "/runs/tso-2")
    assert sum(s3.mixtures().gamma.values()) == pytest.approx(1.0) and s3.mixtures().gamma["tso-1"] == pytest.approx(0.25)


def test_uniform_mixtures_and_explicit_lists_gain_the_old_base(tmp_path):
    matrix = copy.deepcopy(MATRIX)
    for m in matrix["models"]:
        m.pop("weight", None)
    cfg = _cfg(tmp_path, matrix=matrix, pairs={"prompts": "/data/p.jsonl", "negative_sources": ["v1-m"]})
    s2 = register_policy(cfg, 1, "/runs/tso-1")
    assert s2.pairs.negative_sources == ["v1-m", "v2-m"] and s2.mixtures().gamma == {"v1-m": 0.5, "v2-m": 0.5}


def test_a_baseline_is_the_main_config_with_only_its_method_changed(tmp_path):
    cfg = _cfg(tmp_path, sets=["seed=7", "pairs.max_prompts=5", "train.optimizer.lr=3.0e-6", "stages=2"])
    settle_judge(cfg, "/m/v2-m", "uncorrected")
    assert cfg.judge.chat_template == "{{ messages }}" and cfg.judge.revision == "abc"
    for ref, loss, stages in (("builtin:ipo", "ipo", 1), ("builtin:self_reward", "dpo", 2)):
        b = baseline_config(ref, cfg, tmp_path / "run")
        assert b.matrix == cfg.matrix and b.judge == cfg.judge and b.eval == cfg.eval
        # Everything in serve is shared except the app: each baseline has its own, so it never replaces the run's.
        assert b.serve.model_copy(update={"app_name": cfg.serve.app_name}) == cfg.serve
        assert b.serve.app_name == f"{cfg.serve.app_name}-{b.name}" != cfg.serve.app_name
        assert (b.seed, b.pairs.max_prompts, b.pairs.prompts, b.train.optimizer.lr) == (7, 5, "/data/p.jsonl", 3e-6)
        assert b.train.loss.type == loss and b.train.minibatches == 1 and b.stages == stages
        assert b.run_dir == str(tmp_path / "run" / "baselines" / b.name) and b.baselines == []
    assert baseline_config("builtin:self_reward", cfg, tmp_path / "run").pairs.mode == "self_reward"
