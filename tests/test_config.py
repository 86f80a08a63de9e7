"""Run configuration: loading, round-trip, defaults, and every documented validation error."""

import copy

import pytest
import yaml

from tso.config import ConfigError, RunConfig, dump_config, load_config, parse_config
from tso.method.sources import HUMAN, draw_source, resolve_sources, row_rng

BASE = {
    "name": "t",
    "run_dir": "runs/t",
    "matrix": {
        "base": "v2-m",
        "models": [
            {"name": f"v{v}-{s}", "path": f"/models/v{v}-{s}", "version": v, "size": size}
            for v in (1, 2)
            for s, size in (("s", 1.0), ("m", 2.0), ("l", 4.0))
        ],
    },
}


def _write(tmp_path, data, name="run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _err(tmp_path, data) -> ConfigError:
    p = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    return e.value


def test_defaults_are_the_papers(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    t = cfg.train
    assert (t.loss.type, t.loss.beta, t.loss.margin_pos, t.loss.margin_neg) == ("dual_clip", 0.1, 20.0, 10.0)
    assert (t.loss.ipo_tau, t.loss.cdpo_eps) == (0.2, 0.3)
    assert (t.minibatches, t.epochs, t.global_batch, t.seed) == (3, 2, 256, 43)
    assert t.optimizer.betas == (0.9, 0.95) and t.optimizer.weight_decay == 0.05 and t.optimizer.grad_clip == 1.0
    assert t.optimizer.lr == 5e-7 and t.optimizer.warmup_ratio == 0.1 and t.optimizer.schedule == "cosine"
    assert cfg.stages == 3 and cfg.seed == 43
    assert (cfg.pairs.tau_pos, cfg.pairs.tau_neg, cfg.pairs.n_self, cfg.pairs.self_pair_fraction) == (8, 4, 4, 0.5)
    assert cfg.pairs.judge_filter.enabled is False and cfg.pairs.judge_filter.delta == 0
    assert (cfg.eval.sampling.temperature, cfg.eval.sampling.top_p, cfg.eval.sampling.max_new_tokens) == (0.7, 0.9, 2048)


def test_paths_become_absolute_and_expand_tso_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TSO_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    data = copy.deepcopy(BASE)
    data["matrix"]["models"][0]["path"] = "${TSO_HOME}/zoo/v1-s"
    cfg = load_config(_write(tmp_path, data))
    assert cfg.matrix.models[0].path == str(tmp_path / "home" / "zoo" / "v1-s")
    assert cfg.run_dir == str(tmp_path / "runs" / "t")


def test_round_trip(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    again = parse_config(yaml.safe_load(dump_config(cfg)), "dumped")
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()
    assert isinstance(again, RunConfig)


def test_default_sources_follow_the_paper(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    mix = resolve_sources(cfg.matrix, cfg.pairs.human_weight)
    assert mix.alpha == {HUMAN: 0.5, "v2-l": 0.5}
    assert set(mix.gamma) == {"v1-s", "v2-s", "v1-m"}
    assert all(w == pytest.approx(1 / 3) for w in mix.gamma.values())
    assert "v2-m" not in mix.alpha and "v2-m" not in mix.gamma  # the base is in neither set


def test_unknown_key(tmp_path):
    data = copy.deepcopy(BASE)
    data["train"] = {"lerning_rate": 1e-3}
    e = _err(tmp_path, data)
    assert e.field == "train.lerning_rate" and "unknown key" in e.problem


def test_unknown_loss_type(tmp_path):
    data = copy.deepcopy(BASE)
    data["train"] = {"loss": {"type": "kto"}}
    e = _err(tmp_path, data)
    assert e.field == "train.loss.type" and "dual_clip" in e.problem


def test_negative_margin(tmp_path):
    data = copy.deepcopy(BASE)
    data["train"] = {"loss": {"margin_neg": -1}}
    e = _err(tmp_path, data)
    assert e.field == "train.loss.margin_neg" and "greater than or equal to 0" in e.problem


def test_weights_that_do_not_sum_to_one(tmp_path):
    data = copy.deepcopy(BASE)
    for m in data["matrix"]["models"]:
        if m["name"] in ("v1-s", "v2-s", "v1-m"):
            m["weight"] = 0.5
    e = _err(tmp_path, data)
    assert "negative weights sum to 1.5" in e.problem


def test_positive_weights_with_human_do_not_sum_to_one(tmp_path):
    data = copy.deepcopy(BASE)
    data["matrix"]["models"][5]["weight"] = 0.7  # v2-l, human_weight 0.5
    e = _err(tmp_path, data)
    assert "positive weights" in e.problem and "1.2" in e.problem


def test_partial_weights_are_an_error(tmp_path):
    data = copy.deepcopy(BASE)
    data["matrix"]["models"][0]["weight"] = 1.0  # v1-s only
    e = _err(tmp_path, data)
    assert "give all or none" in e.problem


def test_weight_per_model_field_path(tmp_path):
    data = copy.deepcopy(BASE)
    data["matrix"]["models"][2]["weight"] = 1.5
    e = _err(tmp_path, data)
    assert e.field == "matrix.models[2].weight"


def test_unknown_base_and_duplicates(tmp_path):
    data = copy.deepcopy(BASE)
    data["matrix"]["base"] = "v9-x"
    assert "base 'v9-x' is not a model" in _err(tmp_path, data).problem
    data = copy.deepcopy(BASE)
    data["matrix"]["models"][1]["name"] = "v1-s"
    assert "duplicate model names" in _err(tmp_path, data).problem


def test_overlap_of_positive_and_negative_sources_is_an_error(tmp_path):
    data = copy.deepcopy(BASE)
    data["pairs"] = {"positive_sources": ["v2-l", "v1-l"], "negative_sources": ["v1-s", "v1-l"]}
    e = _err(tmp_path, data)
    assert e.field == "" or e.field.startswith("<")  # a whole-config rule
    assert "['v1-l'] are both positive and negative" in e.problem


def test_explicit_sources_and_unknown_names(tmp_path):
    data = copy.deepcopy(BASE)
    data["pairs"] = {"positive_sources": ["v1-l"], "negative_sources": ["v2-s"]}
    cfg = load_config(_write(tmp_path, data))
    assert cfg.mixtures().alpha == {HUMAN: 0.5, "v1-l": 0.5} and cfg.mixtures().gamma == {"v2-s": 1.0}
    data["pairs"] = {"negative_sources": ["v7-q"]}
    assert "not in the matrix: ['v7-q']" in _err(tmp_path, data).problem


def test_thresholds_and_batches(tmp_path):
    data = copy.deepcopy(BASE)
    data["pairs"] = {"tau_pos": 4, "tau_neg": 6}
    e = _err(tmp_path, data)
    assert e.field == "pairs" and "tau_neg" in e.problem
    data = copy.deepcopy(BASE)
    data["train"] = {"global_batch": 20, "micro_batch": 8}
    e = _err(tmp_path, data)
    assert e.field == "train" and "multiple of micro_batch" in e.problem


def test_missing_model_directory_names_the_field(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    with pytest.raises(ConfigError) as e:
        cfg.require_model_dirs("run.yaml")
    assert e.value.field == "matrix.models[0].path" and "v1-s" in e.value.problem


def test_not_a_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("matrix: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_keyed_draws_are_deterministic_and_follow_weights():
    w = {"a": 0.2, "b": 0.8}
    draws = [draw_source(w, row_rng(43, 1, f"p{i}", "pos"))[0] for i in range(4000)]
    again = [draw_source(w, row_rng(43, 1, f"p{i}", "pos"))[0] for i in range(4000)]
    assert draws == again
    assert draws.count("a") / 4000 == pytest.approx(0.2, abs=0.025)
    src, renorm = draw_source({HUMAN: 0.5, "a": 0.5}, row_rng(1, 1, "x", "pos"), available={"a"})
    assert (src, renorm) == ("a", True)


def test_extends_merges_over_a_parent_config(tmp_path):
    parent = _write(tmp_path, BASE, "parent.yaml")
    child = tmp_path / "child.yaml"
    override = {"extends": parent.name, "name": "dpo", "train": {"minibatches": 1, "loss": {"type": "dpo"}}}
    child.write_text(yaml.safe_dump(override))
    cfg = load_config(child)
    assert cfg.name == "dpo" and cfg.train.minibatches == 1 and cfg.train.loss.type == "dpo"
    assert cfg.train.loss.beta == 0.1 and cfg.matrix.base == "v2-m"  # the rest comes from the parent
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({"extends": "loop.yaml"}))
    with pytest.raises(ConfigError, match="circular extends"):
        load_config(loop)
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"extends": "nowhere.yaml"}))
    with pytest.raises(ConfigError, match="extends: no config at"):
        load_config(missing)


# ----------------------------------------------------------------------------- real checkpoints


def _with_model(**fields):
    data = copy.deepcopy(BASE)
    data["matrix"]["models"][0].update(fields)
    return data


def test_hub_ids_stay_ids_and_local_paths_become_absolute(tmp_path, monkeypatch):
    from tso.config import is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local-model").mkdir(parents=True)
    data = copy.deepcopy(BASE)
    models = data["matrix"]["models"]
    models[0].update(path="Qwen/Qwen2.5-0.5B-Instruct", revision="main")
    models[1].update(path="org/local-model")  # exists here: local
    models[2].update(path="./Qwen/Qwen2.5-0.5B-Instruct")  # ./ : local, even if it does not exist
    models[3].update(path="~/models/x")
    cfg = load_config(_write(tmp_path, data))
    paths = [m.path for m in cfg.matrix.models]
    assert paths[0] == "Qwen/Qwen2.5-0.5B-Instruct" and is_hub_id(paths[0])
    assert cfg.matrix.models[0].revision == "main" and cfg.matrix.models[0].trust_remote_code is False
    assert paths[1] == str(tmp_path / "org" / "local-model") and not is_hub_id(paths[1])
    assert paths[2] == str(tmp_path / "Qwen" / "Qwen2.5-0.5B-Instruct")
    assert paths[3].startswith("/") and paths[3].endswith("/models/x")
    with pytest.raises(ConfigError) as e:  # hub ids are skipped; the first missing local directory is named
        cfg.require_model_dirs("run.yaml")
    assert e.value.field == "matrix.models[1].path"


def test_chat_template_is_jinja_text_or_a_file_read_at_load(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    cfg = load_config(_write(tmp_path, _with_model(chat_template=str(tmp_path / "t.jinja"))))
    assert cfg.matrix.models[0].chat_template == template
    data = _with_model(chat_template=template)
    data["judge"] = {"chat_template": template, "stop_tokens": ["<end_of_turn>", 7]}
    cfg = load_config(_write(tmp_path, data))
    assert cfg.matrix.models[0].chat_template == template and cfg.judge.stop_tokens == ["<end_of_turn>", 7]
    e = _err(tmp_path, _with_model(chat_template=str(tmp_path / "missing.jinja")))
    assert e.field == "matrix.models[0].chat_template" and "neither a Jinja template nor a file" in e.problem
    (tmp_path / "plain.txt").write_text("no template here")
    e = _err(tmp_path, _with_model(chat_template=str(tmp_path / "plain.txt")))
    assert e.field == "matrix.models[0].chat_template" and "holds no Jinja template" in e.problem
    e = _err(tmp_path, _with_model(stop_tokens=[]))
    assert e.field == "matrix.models[0].stop_tokens"


def test_pairs_truncation_and_verifier_settings(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.pairs.truncated == "drop" and cfg.pairs.max_redraws == 2 and cfg.eval.verifier == "none"
    assert cfg.judge.answer_format == "evidence_first" and cfg.judge.sampling.max_new_tokens == 256
    for verifier in ("toyworld", "my_pkg.checks:score"):
        assert load_config(_write(tmp_path, {**BASE, "eval": {"verifier": verifier}})).eval.verifier == verifier
    assert _err(tmp_path, {**BASE, "eval": {"verifier": "not a function"}}).field == "eval.verifier"
    assert _err(tmp_path, {**BASE, "pairs": {"truncated": "cut"}}).field == "pairs.truncated"


def test_set_overrides_name_the_item_and_apply_as_yaml(tmp_path):
    from tso.config import load_config_ref, parse_overrides

    assert parse_overrides(["stages=1", "pairs.n_self=0", "train.optimizer.lr=1.0e-5", "baselines=[]"]) == {
        "stages": 1, "pairs.n_self": 0, "train.optimizer.lr": 1e-5, "baselines": []}
    with pytest.raises(ConfigError) as e:
        parse_overrides(["stages"])
    assert e.value.source == "--set" and "KEY=VALUE" in e.value.problem
    cfg, source = load_config_ref(str(_write(tmp_path, BASE)), ["seed=7", "pairs.max_prompts=3"])
    assert (cfg.seed, cfg.pairs.max_prompts, source) == (7, 3, str(tmp_path / "run.yaml"))


def test_standalone_baselines_have_their_own_run_dir_and_no_nested_baselines():
    from tso.config import builtin_config_path, method_overrides

    for name in ("dpo", "ipo", "cdpo", "self_reward", "rso"):
        cfg = load_config(builtin_config_path(name))
        assert cfg.run_dir.endswith(f"runs/{name}") and cfg.baselines == [] and cfg.name == name
        _, overrides = method_overrides(f"builtin:{name}")
        assert not {"matrix", "run_dir", "baselines", "seed", "eval"} & set(overrides)
    assert method_overrides("builtin:ipo")[1]["train"] == {"minibatches": 1, "loss": {"type": "ipo", "ipo_tau": 0.2}}
