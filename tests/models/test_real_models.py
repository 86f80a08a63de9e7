"""Real checkpoints (the SmolLM2 fixture): chat templates, stop tokens, truncation, and TSO end to end.

The toy world's byte-level models hide what real checkpoints bring: a BPE vocabulary of 49,152,
a ChatML template with a default system turn, `<|im_end|>` ending a turn, answers that run past
`max_new_tokens`, a base model without a chat template. Everything here runs on those.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tso.config import ConfigError, parse_config
from tso.models.fixture import smollm2_matrix_section

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SERVE_PORT = 18611
ENGINE = {"kind": "transformers", "dtype": "bfloat16", "torch_threads": 1, "max_batch_size": 32,
          "batch_wait_timeout_s": 0.02}
RES = {"num_cpus": 0.1, "max_ongoing_requests": 64}


def real(home: Path, name: str) -> str:
    return str(home / "real" / name)


def matrix(home: Path, **per_model) -> dict:
    section = smollm2_matrix_section(home)
    for m in section["models"]:
        m.update({"engine": dict(ENGINE), "resources": dict(RES), **per_model.get(m["name"], {})})
    return section


def chatml(home: Path) -> str:
    """The fixture's own template, read from its base: configured for the template-less copy."""
    return (home / "real" / "smollm2-121m" / "chat_template.jinja").read_text()


# ----------------------------------------------------------------------------- templates and stop tokens


def test_a_model_without_chat_template_fails_before_any_generation_and_works_with_one(smollm2_home, tmp_path):
    from tso.engines import SamplingParams
    from tso.engines.hf import HFEngine
    from tso.models.checkpoint import checkpoint_options
    from tso.models.preflight import check_models

    section = matrix(smollm2_home)
    section["models"].append({"name": "notemplate", "path": real(smollm2_home, "smollm2-121m-notemplate"),
                              "version": 0, "size": 0.121, "engine": dict(ENGINE)})
    cfg = parse_config({"run_dir": str(tmp_path), "matrix": section})
    with pytest.raises(ConfigError) as e:
        check_models(cfg, "real.yaml")
    assert e.value.field == "matrix.models[4].chat_template" and "notemplate" in e.value.problem
    assert "no chat template" in str(e.value) and str(e.value).startswith("real.yaml: ")

    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(chatml(smollm2_home))
    section["models"][4]["chat_template"] = str(template_file)
    cfg = parse_config({"run_dir": str(tmp_path), "matrix": section})
    check_models(cfg, "real.yaml")
    # same weights, the template supplied by the config: the same greedy answer as the templated base
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    params = [SamplingParams(temperature=0, max_new_tokens=12)]
    plain = HFEngine(cfg.matrix.models[4].path, cfg.matrix.models[4].engine, checkpoint_options(cfg.matrix.models[4]))
    base = HFEngine(cfg.matrix.models[1].path, cfg.matrix.models[1].engine, checkpoint_options(cfg.matrix.models[1]))
    assert plain.encode(prompt) == base.encode(prompt)
    assert plain.generate([prompt], params)[0].texts == base.generate([prompt], params)[0].texts


def test_finish_reasons_stop_tokens_and_a_bad_stop_token(smollm2_home, tmp_path):
    from tso.engines import SamplingParams
    from tso.engines.hf import HFEngine
    from tso.models.chat import end_of_turn_token
    from tso.models.preflight import check_models

    engine = HFEngine(real(smollm2_home, "smollm2-135m"), parse_config(
        {"run_dir": str(tmp_path), "matrix": matrix(smollm2_home)}).matrix.models[0].engine)
    assert end_of_turn_token(engine.tokenizer) == "<|im_end|>"
    prompt = [{"role": "user", "content": "What is 2+3?"}]
    done, cut = engine.generate([prompt, prompt], [SamplingParams(temperature=0, max_new_tokens=32),
                                                   SamplingParams(temperature=0, max_new_tokens=3)])
    assert done.finish_reasons == ["stop"] and done.stop_tokens == ["<|im_end|>"] and "5" in done.texts[0]
    assert cut.finish_reasons == ["length"] and cut.stop_tokens == [None] and cut.num_tokens == [3]

    section = matrix(smollm2_home, **{"smollm2-114m": {"stop_tokens": ["<end_of_turn>"]}})
    with pytest.raises(ConfigError) as e:
        check_models(parse_config({"run_dir": str(tmp_path), "matrix": section}), "real.yaml")
    assert e.value.field == "matrix.models[3].stop_tokens" and "<end_of_turn>" in e.value.problem


def test_training_appends_the_policys_end_of_turn_only_to_finished_answers(smollm2_home):
    from tso.models.checkpoint import load_tokenizer
    from tso.train.data import encode_prompt, tokenize_pairs

    tok = load_tokenizer(real(smollm2_home, "smollm2-121m"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = [
        {"id": "a", "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "The colour of the sky on a",
         "chosen_finish_reason": "stop", "chosen_stop_token": "<|im_end|>",
         "rejected_finish_reason": "length", "rejected_stop_token": None},
        # an answer from another model family: its stop token is not the policy's, so the policy's own ends it
        {"id": "b", "prompt": "Name a colour.", "chosen": "Red.", "rejected": "Colour.",
         "chosen_finish_reason": "stop", "chosen_stop_token": "<end_of_turn>"},
    ]
    pairs, rep = tokenize_pairs(rows, tok, max_length=256, stop_ids=[im_end])
    a, b = pairs
    prompt = encode_prompt(tok, "Name a colour.")
    assert a.prompt == prompt and tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert a.chosen[-1] == im_end and tok.decode(a.chosen[:-1]) == "Blue."
    assert im_end not in a.rejected and tok.decode(a.rejected) == "The colour of the sky on a"
    assert b.chosen[-1] == im_end and b.rejected[-1] == im_end  # no finish reason: a finished (human) answer
    assert rep.end_tokens == {"<|im_end|>": 3} and rep.unterminated == 1


# ----------------------------------------------------------------------------- TSO end to end


def _prompts(path: Path) -> Path:
    """Real instruction prompts, most without a human answer, and every kind of bad row seen live."""
    rows = [json.dumps(r) for r in (
        {"id": "r00", "prompt": "What is 7 times 8?", "human": "7 times 8 is 56."},
        {"id": "r01", "prompt": "What is the capital of Japan?", "human": "Tokyo."},
        {"id": "r02", "prompt": "Name the largest planet in our solar system.", "human": "Jupiter."},
        {"id": "r03", "prompt": "How many days are in a leap year?"},
        {"id": "r04", "prompt": "Translate 'thank you' into French."},
        {"id": "r05", "prompt": "What is the square root of 81?"},
        {"id": "r06", "prompt": "Who wrote 'Romeo and Juliet'?"},
        {"id": "r07", "prompt": "List three primary colors."},
        {"id": "r08", "prompt": "What is 15 plus 27?"},
        {"id": "r09", "prompt": "Name a fruit that is yellow."},
        {"id": "r10", "prompt": "What does CPU stand for?"},
        {"id": "r11", "prompt": "How many legs does a spider have?"},
        # longer than smollm2-114m's context (128 tokens) but not the others': that source is left out
        {"id": "r12", "prompt": "Summarise: " + "The quick brown fox jumps over the lazy dog. " * 14},
        # a human answer longer than the judge can read with room for its verdict: the answer is dropped
        {"id": "r13", "prompt": "What is 2+2?", "human": "Four. " + "Four is two plus two. " * 60},
    )]
    bad = [
        "caf\xe9".encode("latin-1"),  # invalid UTF-8
        json.dumps({"id": "bad-surrogate", "prompt": "\ud800 alone"}).encode(),  # a lone surrogate
        json.dumps({"id": "bad-long", "prompt": "Repeat: " + "lorem ipsum dolor " * 120}).encode(),  # > the policy's context
    ]
    path.write_bytes(b"\n".join([r.encode() for r in rows] + bad) + b"\n")
    return path


def real_run_config(home: Path, run_dir: Path) -> dict:
    prompts = _prompts(run_dir.parent / "real-prompts.jsonl")
    eval_prompts = run_dir.parent / "real-eval.jsonl"
    eval_prompts.write_text("".join(json.dumps({"id": f"e{i}", "prompt": p}) + "\n" for i, p in enumerate(
        ["What is 9 times 6?", "What is the capital of Italy?", "How many hours are in a day?",
         "Name a programming language."])))
    return {
        "name": "real-test", "run_dir": str(run_dir), "seed": 3, "stages": 1,
        "matrix": matrix(home, **{"smollm2-114m": {"engine": {**ENGINE, "max_model_len": 128}},
                                  "smollm2-121m": {"engine": {**ENGINE, "max_model_len": 320}}}),
        "judge": {"path": real(home, "smollm2-135m"), "dimensions": ["quality"],
                  "rubrics": {"quality": "Rate how correct and helpful the answer is."},
                  "answer_format": "score_only", "sampling": {"temperature": 0.0, "max_new_tokens": 8},
                  "engine": {**ENGINE, "max_model_len": 384}, "resources": RES},
        "pairs": {"prompts": str(prompts), "n_self": 2, "max_redraws": 2,
                  "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 40}},
        "train": {"minibatches": 2, "epochs": 1, "global_batch": 2, "micro_batch": 2, "max_length": 320,
                  "optimizer": {"lr": 1e-5, "warmup_ratio": 0.0}},
        "eval": {"prompts": str(eval_prompts), "verifier": "none",
                 "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 40}},
        "serve": {"port": SERVE_PORT, "app_name": "tso-real-test"},
    }


@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_tso_run_end_to_end_on_real_checkpoints(ray_cluster, smollm2_home, tmp_path):
    from ray import serve

    from tso.config import load_config
    from tso.run.pipeline import run_pipeline

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg_path = tmp_path / "real.yaml"
    cfg_path.write_text(yaml.safe_dump(real_run_config(smollm2_home, run_dir)))
    serve.shutdown()
    try:
        result = run_pipeline(load_config(cfg_path), str(cfg_path))
    finally:
        serve.shutdown()

    pairs_dir = run_dir / "stage-1" / "pairs"
    s = json.loads((pairs_dir / "summary.json").read_text())
    rejects = [json.loads(x) for x in (pairs_dir / "rejects.jsonl").read_text().splitlines()]
    by_reason = {r["reason"]: r for r in rejects}
    # every bad row is a reject with its line and reason, and the stage went on
    assert by_reason["invalid_utf8"]["line"] == 15 and by_reason["invalid_unicode"]["line"] == 16
    assert by_reason["prompt_too_long"]["line"] == 17 and "context 320" in by_reason["prompt_too_long"]["detail"]
    assert by_reason["human_too_long"]["line"] == 14 and by_reason["human_too_long"]["scope"] == "human_answer_dropped"
    assert s["rejected_rows"] == 3 and s["human_answers_dropped"] == 1 and s["prompts"] == 14
    assert s["unavailable_sources"] == {"smollm2-114m": 1}
    # truncation is data: cut answers were counted and none of them is in a pair
    rows = pq.read_table(pairs_dir / "pairs.parquet").to_pylist()
    assert s["truncated_action"] == "drop" and sum(s["truncated"].values()) > 0
    assert rows and s["pairs"] == len(rows) >= 4
    assert all(r["chosen_finish_reason"] == r["rejected_finish_reason"] == "stop" for r in rows)
    assert all(r[f"{side}_stop_token"] == "<|im_end|>" for r in rows for side in ("chosen", "rejected")
               if r[f"{side}_source"] != "human")
    assert all(r["chosen_source"] != "human" for r in rows if r["id"] not in ("r00", "r01", "r02"))
    assert all(r["alpha_renormalized"] for r in rows if r["id"] in ("r03", "r13") and r["kind"] == "matrix")
    assert s["judge"]["judged"] > 0 and s["judge"]["parse_rate"] is not None
    # training ended finished answers with the policy's end-of-turn token, and changed the weights
    train = json.loads((run_dir / "stage-1" / "train" / "summary.json").read_text())
    assert set(train["tokenize"]["end_tokens"]) == {"<|im_end|>"} and train["tokenize"]["unterminated"] == 0
    assert train["steps"] > 0 and len(train["boundaries"]) == 2
    from safetensors.torch import load_file

    base = load_file(real(smollm2_home, "smollm2-121m") + "/model.safetensors")
    tuned = load_file(str(run_dir / "stage-1" / "train" / "policy" / "model.safetensors"))
    assert any(not (base[k].float() == tuned[k].float()).all() for k in base if k in tuned)
    # an honest report: no ground truth claimed, the judge named, its parse rate and truncation shown
    report = Path(result["report"]).read_text()
    assert "No verifier is configured" in report and "verifier mean" not in report
    assert "The judge is the configured judge.path" in report and "| eval tso-1 |" in report
    evals = {e["label"]: e for e in (json.loads(p.read_text()) for p in (run_dir / "eval").glob("*.json"))}
    assert set(evals) == {"base", "tso-1"} and all(e["n"] == 4 and e["truncation_rate"] is not None
                                                    for e in evals.values())
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "done" and meta["judge"]["kind"] == "configured"


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.timeout(1800)
def test_tso_run_end_to_end_with_the_vllm_engine(ray_cluster, smollm2_home, tmp_path):
    """The same run with the policy and the judge on vLLM: the policy's new weights are swapped into
    the running engine in place after training (weight version 1 on the same replica)."""
    pytest.importorskip("vllm")
    from ray import serve

    from tso.config import load_config
    from tso.run.pipeline import run_pipeline
    from tso.serving.client import ServeClient

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = real_run_config(smollm2_home, run_dir)
    vllm = {"kind": "vllm", "dtype": "bfloat16", "max_model_len": 384, "kv_cache_gib": 1}
    for m in data["matrix"]["models"]:
        if m["name"] == data["matrix"]["base"]:
            m["engine"] = {**vllm, "max_model_len": 320}
    data["judge"]["engine"] = vllm
    cfg_path = tmp_path / "real-vllm.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    serve.shutdown()
    try:
        result = run_pipeline(load_config(cfg_path), str(cfg_path), keep_serving=True)
        client = ServeClient("tso-real-test")
        policy, judge = (client.handle(n).info.remote().result() for n in ("policy", "judge"))
        assert policy["engine"] == judge["engine"] == "vllm"
        assert policy["checkpoint"] == result["policies"][0] and policy["weight_version"] == 1
    finally:
        serve.shutdown()
    s = json.loads((run_dir / "stage-1" / "pairs" / "summary.json").read_text())
    assert s["pairs"] >= 4 and s["rejected_rows"] == 3 and s["judge"]["judged"] > 0
    rows = pq.read_table(run_dir / "stage-1" / "pairs" / "pairs.parquet").to_pylist()
    assert all(r["chosen_finish_reason"] == r["rejected_finish_reason"] == "stop" for r in rows)
    evals = {json.loads(p.read_text())["label"] for p in (run_dir / "eval").glob("*.json")}
    assert evals == {"base", "tso-1"} and (run_dir / "report.md").is_file()
