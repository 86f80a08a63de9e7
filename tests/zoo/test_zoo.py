"""The zoo: a fixture-built matrix loads and generates; the ladder check; skipping built models."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tso.zoo.ladder import check_ladder

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def fixture_home(tmp_path_factory):
    from tso.zoo.build import build_fixture_matrix

    home = tmp_path_factory.mktemp("tso_home")
    manifest = build_fixture_matrix(home, seed=0)
    return home, manifest


# ----------------------------------------------------------------------------- the fixture matrix


def test_fixture_matrix_loads_with_from_pretrained_and_generates(fixture_home):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tso.zoo.build import fixture_matrix_entries

    home, manifest = fixture_home
    entries = fixture_matrix_entries(home)
    assert [e["name"] for e in entries] == ["v1-s", "v1-m", "v1-l", "v2-s", "v2-m", "v2-l"]
    assert [e["name"] for e in entries if e["base"]] == ["v2-m"]
    for e in entries:
        path = Path(e["path"])
        assert path == Path(home) / "zoo" / e["name"]
        model = AutoModelForCausalLM.from_pretrained(str(path))
        tok = AutoTokenizer.from_pretrained(str(path))
        assert sum(p.numel() for p in model.parameters()) == e["params"] == manifest["models"][e["name"]]["params"]
        text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1]
        assert isinstance(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), str)
        assert not torch.isnan(model(**ids).logits).any()
    # Sizes order the matrix; version 2 continued version 1 (more steps seen in total).
    ms = manifest["models"]
    assert ms["v1-s"]["params"] < ms["v1-m"]["params"] < ms["v1-l"]["params"]
    assert ms["v2-m"]["training"]["total_steps"] > ms["v1-m"]["training"]["total_steps"]
    assert ms["v2-m"]["training"]["init_from"] == "v1-m"
    assert manifest["status"] == "ok" and manifest["ladder"]["enforced"] is False
    assert not list((Path(home) / "zoo").glob(".tmp-*"))


def test_fixture_matrix_section_validates_as_a_run_config(fixture_home):
    from tso.config import parse_config
    from tso.method.sources import resolve_sources
    from tso.zoo.build import fixture_matrix_section

    home, _ = fixture_home
    cfg = parse_config({"matrix": fixture_matrix_section(home)})
    cfg.require_model_dirs()
    mix = resolve_sources(cfg.matrix, cfg.pairs.human_weight)
    assert set(mix.gamma) == {"v1-s", "v2-s", "v1-m"} and set(mix.alpha) == {"human", "v2-l"}


def test_rebuild_skips_built_models_and_rebuilds_with_force(fixture_home, tmp_path):
    import shutil

    from tso.zoo.build import build_fixture_matrix

    home, manifest = fixture_home
    home2 = tmp_path / "home"
    shutil.copytree(home, home2)
    weights = Path(home2) / "zoo" / "v1-s" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    logs = []
    from tso.zoo.build import build_matrix
    from tso.zoo.spec import FIXTURE_MATRIX

    again = build_matrix(home2, FIXTURE_MATRIX, seed=0, workers=1, progress=False, log=logs.append)
    assert weights.stat().st_mtime_ns == mtime  # not retrained
    assert any("already built" in m and "v2-l" in m for m in logs)
    assert {k: v["heldout_score"] for k, v in again["models"].items()} == \
        {k: v["heldout_score"] for k, v in manifest["models"].items()}
    # A changed build setting (another seed) or --force retrains, deterministically.
    forced = build_fixture_matrix(home2, seed=0, force=True)
    assert weights.stat().st_mtime_ns != mtime
    assert {k: v["heldout_score"] for k, v in forced["models"].items()} == \
        {k: v["heldout_score"] for k, v in manifest["models"].items()}
    a = (Path(home) / "zoo" / "v2-m" / "model.safetensors").read_bytes()
    b = (Path(home2) / "zoo" / "v2-m" / "model.safetensors").read_bytes()
    assert a == b


def test_a_deleted_model_folder_is_rebuilt(fixture_home, tmp_path):
    import shutil

    from tso.zoo.build import build_matrix
    from tso.zoo.spec import FIXTURE_MATRIX

    home, manifest = fixture_home
    home2 = tmp_path / "home"
    shutil.copytree(home, home2)
    shutil.rmtree(home2 / "zoo" / "v1-l")
    logs = []
    again = build_matrix(home2, FIXTURE_MATRIX, seed=0, workers=1, progress=False, log=logs.append)
    assert (home2 / "zoo" / "v1-l" / "config.json").is_file()
    assert again["models"]["v1-l"]["heldout_score"] == manifest["models"]["v1-l"]["heldout_score"]


# ----------------------------------------------------------------------------- the ladder check


def _manifest(scores: dict[str, float], prompts: int = 350, base: str = "v2-m") -> dict:
    params = {"s": 40_000, "m": 130_000, "l": 650_000}
    models = {}
    for name, score in scores.items():
        v, label = name.split("-")
        models[name] = {"name": name, "version": int(v[1:]), "size_label": label, "params": params[label],
                        "heldout_score": score}
    return {"models": models, "eval": {"prompts": prompts}, "base": base}


GOOD = {"v1-s": 4.0, "v1-m": 4.5, "v1-l": 5.0, "v2-s": 4.4, "v2-m": 5.0, "v2-l": 5.6}


def test_monotone_ladder_passes():
    res = check_ladder(_manifest(GOOD))
    assert res.ok, res.reasons
    assert len(res.steps) == 4 + 3  # 2 size steps per version, 1 version step per size
    assert min(s["gain"] for s in res.steps) == pytest.approx(0.4)


def test_inverted_size_fails_and_names_the_pair():
    scores = dict(GOOD, **{"v1-m": 5.2})  # v1-m above v1-l
    res = check_ladder(_manifest(scores))
    assert not res.ok
    assert any("v1-m (5.20) -> v1-l (5.00)" in r and "does not rise" in r for r in res.reasons), res.reasons


def test_a_step_of_0_2_fails_and_names_the_pair():
    scores = dict(GOOD, **{"v2-m": 5.4})  # v2-m 5.4 -> v2-l 5.6; every other step passes
    res = check_ladder(_manifest(scores))
    assert not res.ok
    assert len(res.reasons) == 1
    assert "v2-m (5.40) -> v2-l (5.60)" in res.reasons[0] and "+0.20" in res.reasons[0]
    scores = dict(GOOD, **{"v2-s": 4.2})  # v1-s 4.0 -> v2-s 4.2: version step too small
    res = check_ladder(_manifest(scores))
    assert not res.ok and "v1-s (4.00) -> v2-s (4.20)" in res.reasons[0] and "version" in res.reasons[0]


def test_ladder_needs_enough_prompts_scores_and_a_base_with_neighbours():
    assert "at least 300" in check_ladder(_manifest(GOOD, prompts=200)).reasons[0]
    missing = _manifest(GOOD)
    del missing["models"]["v1-l"]["heldout_score"]
    assert any("v1-l" in r and "no held-out score" in r for r in check_ladder(missing).reasons)
    assert any("no stronger neighbour" in r for r in check_ladder(_manifest(GOOD, base="v2-l")).reasons)
    assert any("no weaker neighbour" in r for r in check_ladder(_manifest(GOOD, base="v1-s")).reasons)
    assert check_ladder(_manifest(GOOD, base="v1-m")).ok
    assert not check_ladder({"models": {}}).ok


def test_build_exits_nonzero_and_marks_manifest_failed_when_ladder_fails(fixture_home, tmp_path):
    """`tso zoo build` with the ladder enforced on the fixture matrix (a few training steps cannot
    pass it): the built models are reused, the check fails, the exit code and manifest say so."""
    import shutil

    home, manifest = fixture_home
    home2 = tmp_path / "home"
    shutil.copytree(home, home2)
    env = dict(os.environ, TSO_HOME=str(tmp_path / "unused"))
    out = subprocess.run([sys.executable, "-m", "tso.cli", "zoo", "build", "--fixture", "--check-ladder", "--no-data",
                          "--home", str(home2)], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "already built" in out.stdout and "quality ladder does not hold" in out.stderr
    on_disk = json.loads((home2 / "zoo" / "manifest.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["reasons"]
    assert on_disk["reasons"] == check_ladder(on_disk).reasons
    assert all(r in out.stderr for r in on_disk["reasons"])
    # `tso zoo show` reports it and exits non-zero too.
    shown = subprocess.run([sys.executable, "-m", "tso.cli", "zoo", "show", "--home", str(home2)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 1
    assert "matrix status: failed" in shown.stdout and "v2-m" in shown.stdout


def test_cli_build_fixture_and_show(tmp_path):
    env = dict(os.environ, TSO_HOME=str(tmp_path / "unused"))
    home = tmp_path / "home"
    out = subprocess.run([sys.executable, "-m", "tso.cli", "zoo", "build", "--fixture", "--home", str(home)],
                         capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "v2-l" in out.stdout and "matrix status: ok" in out.stdout
    for name in ("prompts_train", "prompts_pref", "prompts_eval", "feedback_train", "feedback_eval"):
        path = home / "data" / f"{name}.jsonl"
        assert path.is_file() and path.stat().st_size > 0
    fb = [json.loads(line) for line in (home / "data" / "feedback_eval.jsonl").read_text().splitlines()]
    assert any(r["kind"].startswith("model:") for r in fb)  # answers of the built models are among them
    shown = subprocess.run([sys.executable, "-m", "tso.cli", "zoo", "show", "--home", str(home)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "version", "size"]
    assert sum(1 for line in lines if line.startswith(("v1-", "v2-"))) == 6


def test_demo_config_validates_and_matches_the_demo_matrix(tmp_path, monkeypatch):
    from tso.config import builtin_config_path, load_config
    from tso.zoo.build import demo_matrix_entries

    monkeypatch.setenv("TSO_HOME", str(tmp_path))
    cfg = load_config(builtin_config_path("demo"))
    entries = {e["name"]: e for e in demo_matrix_entries()}
    assert cfg.matrix.base == "v2-m"
    assert {m.name for m in cfg.matrix.models} == set(entries)
    for m in cfg.matrix.models:
        e = entries[m.name]
        assert m.path == e["path"] == str(tmp_path / "zoo" / m.name)
        assert m.version == e["version"]
        assert m.size == pytest.approx(e["size"], abs=1e-3)  # parameters in millions
        assert m.resources.num_cpus <= 0.25
    with pytest.raises(Exception, match="tso zoo build"):
        cfg.require_model_dirs()


def test_manifest_copy_is_not_mutated_by_the_check():
    m = _manifest(GOOD)
    before = copy.deepcopy(m)
    check_ladder(m)
    assert m == before


# ----------------------------------------------------------------------------- SFT and generation


def test_sft_supervises_only_the_answer_and_its_eos(tiny_tokenizer):
    from tso.toyworld.tasks import generate_tasks
    from tso.zoo.sft import IGNORE, collate, encode_examples

    tasks = generate_tasks("train", 14, seed=0)
    examples = encode_examples(tiny_tokenizer, tasks)
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    for i, (t, e) in enumerate(zip(tasks, examples)):
        labels = batch["labels"][i]
        supervised = labels[labels != IGNORE].tolist()
        assert tiny_tokenizer.decode(supervised) == t["human"] + tiny_tokenizer.eos_token
        assert batch["attention_mask"][i].sum() == len(e.ids)
        prompt = tiny_tokenizer.decode(list(e.ids[: e.n_prompt]))
        assert prompt == f"<|user|>{t['prompt']}<|assistant|>"


def test_sft_lowers_the_loss_deterministically(tiny_tokenizer):
    from tso.toyworld.tasks import training_pool
    from tso.zoo.sft import SFTBudget, encode_examples, sft_train
    from tso.zoo.tiny import random_tiny_llama

    examples = encode_examples(tiny_tokenizer, training_pool("train", 700, seed=0))
    budget = SFTBudget(steps=40, batch=32, lr=6e-3, pool=700, warmup=5)
    runs = []
    for _ in range(2):
        model = random_tiny_llama(tiny_tokenizer, seed=0, hidden=16, layers=1, heads=2)
        runs.append(sft_train(model, examples, budget, seed=1, pad_id=tiny_tokenizer.pad_token_id))
    assert runs[0] == runs[1]
    assert runs[0]["final_loss"] < 0.75 * runs[0]["first_loss"]  # from ln(262) = 5.57


def test_batched_generation_with_left_padding_matches_one_by_one(fixture_home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tso.toyworld.tasks import generate_tasks
    from tso.zoo.generate import generate_answers

    home, _ = fixture_home
    path = str(Path(home) / "zoo" / "v2-l")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prompts = [t["prompt"] for t in generate_tasks("eval", 21, seed=0)]
    batched = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=8)
    assert batched == [generate_answers(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    sampled = generate_answers(model, tok, prompts, max_new_tokens=8, temperature=1.0, seed=5)
    assert sampled == generate_answers(model, tok, prompts, max_new_tokens=8, temperature=1.0, seed=5)
    assert sampled != batched
