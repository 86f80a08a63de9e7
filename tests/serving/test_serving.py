"""The Serve stack end to end: real local Ray cluster, real Serve deployments, real HTTP, tiny models.

One app is deployed for the module (about half a minute on 2 cores); the tests then exercise it in
order: the CLI redeploy (a no-op), the REST endpoints, batching, seeds, every bad input, hot-swaps
of the policy and the judge (reconfigure, no restart), the handle API and bearer-token auth.
"""

from __future__ import annotations

import asyncio
import os
import threading

import httpx
import pytest

from tests.helpers import JUDGE_ANSWERS, JUDGE_RUBRICS, REPO, served_app, tiny_model_dirs, train_tiny_judge
from tso.config import EngineConfig, dump_config, parse_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

PORT = 18161
APP = "tso-test"
TOKEN_ENV = "TSO_TEST_SERVING_TOKEN"
URL = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    dirs = {"old": str(tiny_model_dir),
            **tiny_model_dirs(tmp_path_factory.mktemp("serving-models"), tiny_tokenizer, {"base": 1, "stage1": 2})}
    dirs["judge"] = str(train_tiny_judge(tmp_path_factory.mktemp("judge"), tiny_tokenizer))
    return dirs


def _engine(**kw) -> dict:
    return {"kind": "transformers", "torch_threads": 1, "max_batch_size": 16, "batch_wait_timeout_s": 0.05, **kw}


@pytest.fixture(scope="module")
def cfg(model_dirs, tmp_path_factory):
    res = {"num_cpus": 0.25, "max_ongoing_requests": 32}
    return parse_config({
        "run_dir": str(tmp_path_factory.mktemp("run")),
        "matrix": {"base": "base", "models": [
            {"name": "old", "path": model_dirs["old"], "version": 0, "size": 1, "engine": _engine(), "resources": res},
            {"name": "base", "path": model_dirs["base"], "version": 1, "size": 1, "engine": _engine(), "resources": res},
        ]},
        "judge": {"rubrics": JUDGE_RUBRICS, "dimensions": ["correctness", "conciseness"],
                  "engine": _engine(), "resources": res},
        "serve": {"host": "127.0.0.1", "port": PORT, "app_name": APP, "auth_token_env": TOKEN_ENV,
                  "max_body_bytes": 20_000, "max_field_chars": 2000, "max_batch_items": 4},
    })


@pytest.fixture(scope="module")
def app(ray_cluster, cfg):
    os.environ.pop(TOKEN_ENV, None)
    with served_app(cfg, PORT):
        yield cfg


@pytest.fixture()
def client(app):
    with httpx.Client(base_url=URL, timeout=120) as c:
        yield c


def handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, APP)


def replicas(cfg) -> dict[str, str]:
    """Replica id per deployment: unchanged ids mean nothing was restarted."""
    from tso.serving.app import deployment_names

    return {n: handle(n).info.remote().result()["replica"] for n in deployment_names(cfg)}


def local_text(path: str, prompt, **params) -> list[str]:
    from tso.engines import SamplingParams
    from tso.engines.hf import HFEngine

    eng = HFEngine(path, EngineConfig(kind="transformers"))
    return eng.generate([prompt], [SamplingParams(**params)])[0].texts


# ----------------------------------------------------------------------------- deploy


def test_cli_redeploy_of_the_same_config_restarts_nothing(app, cfg, tmp_path):
    from tso.cli import main

    before = replicas(cfg)
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    assert main(["serve", str(path), "--port", str(PORT)]) == 0
    assert replicas(cfg) == before


def test_models_lists_every_deployment(client, model_dirs):
    """OpenAI's model list, each entry with tso's fields. The base has no deployment of its own: the
    policy deployment serves it (no second copy of the same weights)."""
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and all(m["object"] == "model" and m["owned_by"] == "tso" for m in body["data"])
    by_name = {m["id"]: m for m in body["data"]}
    assert set(by_name) == {"old", "policy", "judge"} and all(m["name"] == k for k, m in by_name.items())
    assert by_name["old"]["role"] == "negative" and by_name["old"]["version"] == 0
    assert by_name["policy"]["role"] == "policy" and by_name["policy"]["checkpoint"] == model_dirs["base"]
    assert by_name["policy"]["base"] == "base" and by_name["policy"]["weight_version"] == 0
    judge = by_name["judge"]
    assert judge["uncorrected"] is True and judge["checkpoint"] == model_dirs["base"]  # no judge.path: the base
    assert judge["dimensions"] == ["correctness", "conciseness"]
    assert all(m["max_context"] == 1024 and m["engine"] == "transformers" for m in body["data"])
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    assert {"/v1/score", "/v1/score/batch", "/v1/generate", "/v1/models"} <= set(client.get("/openapi.json").json()["paths"])


def test_generate_round_trip(client, model_dirs, tiny_tokenizer):
    req = {"model": "base", "prompt": "What is 3 + 4?", "n": 2, "temperature": 0.9, "top_p": 0.95, "seed": 21,
           "max_new_tokens": 12}
    r = client.post("/v1/generate", json=req)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "policy" and out["checkpoint"] == model_dirs["base"]  # the policy deployment serves the base
    assert len(out["texts"]) == 2 and out["texts"][0] != out["texts"][1]
    assert all(1 <= n <= 12 for n in out["num_tokens"]) and set(out["finish_reasons"]) <= {"stop", "length"}
    assert out["seeds"][0] == 21 and out["prompt_tokens"] == len("What is 3 + 4?")
    # the same text as the same model and seed in this process: reproducible across processes
    assert out["texts"] == local_text(model_dirs["base"], req["prompt"], n=2, temperature=0.9, top_p=0.95, seed=21,
                                      max_new_tokens=12)
    assert client.post("/v1/generate", json=req).json()["texts"] == out["texts"]
    other = client.post("/v1/generate", json={**req, "model": "old"}).json()
    assert other["model"] == "old" and other["texts"] != out["texts"]
    chat = [{"role": "user", "content": "hi ✓"}]
    r = client.post("/v1/generate", json={"model": "policy", "prompt": chat, "temperature": 0, "max_new_tokens": 5})
    rendered = tiny_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert r.status_code == 200 and r.json()["prompt_tokens"] == len(tiny_tokenizer(rendered)["input_ids"]) == 8


def test_openai_client_talks_to_the_policy_and_the_matrix(client, model_dirs):
    """The `openai` package against the live app: chat and text completions, the model list, the
    usage counts; a chat completion is the same answer as tso's own /v1/generate of the request."""
    import openai

    oa = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    chat = oa.chat.completions.create(model="policy", messages=messages, max_tokens=8, temperature=0.8, top_p=0.9,
                                      seed=4, n=2)
    assert chat.object == "chat.completion" and len(chat.choices) == 2 and chat.model == "policy"
    assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in chat.choices)
    mine = client.post("/v1/generate", json={"model": "policy", "prompt": messages, "max_new_tokens": 8,
                                             "temperature": 0.8, "top_p": 0.9, "seed": 4, "n": 2}).json()
    assert [c.message.content for c in chat.choices] == mine["texts"]
    assert chat.usage.prompt_tokens == mine["prompt_tokens"] and chat.usage.completion_tokens == sum(mine["num_tokens"])
    text = oa.completions.create(model="old", prompt="abc", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.choices[0].text == local_text(
        model_dirs["old"], "abc", temperature=0, max_new_tokens=5)[0]  # raw text, no chat template
    assert {m.id for m in oa.models.list()} == {"old", "policy", "judge"}
    with pytest.raises(openai.UnprocessableEntityError):
        oa.chat.completions.create(model="policy", messages=messages, stream=True)
    r = client.post("/v1/chat/completions", json={"model": "policy", "messages": messages, "stream": True})
    assert r.status_code == 422 and "streaming is not supported" in r.text
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="gpt-9", messages=messages)
    with pytest.raises(openai.UnprocessableEntityError):
        oa.chat.completions.create(model="policy", messages=messages, temperature=3)


def test_uncorrected_random_judge_is_unscored_with_reason(client):
    r = client.post("/v1/score", json={"prompt": "2+2?", "response": "4"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["score"] is None and out["reason"] == "no_score" and out["dimension"] == "mean"
    assert [d["dimension"] for d in out["dimensions"]] == ["correctness", "conciseness"]
    assert all(d["score"] is None and d["reason"] == "no_score" and d["raw"] for d in out["dimensions"])


def test_batching_batches_and_seeds_ignore_batch_companions(app, cfg):
    target = {"model": "base", "prompt": "seeded prompt", "temperature": 1.0, "top_p": 0.9, "seed": 77,
              "max_new_tokens": 16}
    with httpx.Client(base_url=URL, timeout=120) as c:
        alone = c.post("/v1/generate", json=target).json()["texts"]
    handle("policy").stats.remote(reset=True).result()

    async def burst():
        reqs = [{"model": "base", "prompt": f"companion {i} " * (i % 5 + 1), "temperature": 0.5 + (i % 3) / 2,
                 "seed": i, "max_new_tokens": 4 + 3 * (i % 7), "n": 1 + i % 2} for i in range(23)]
        reqs.insert(11, target)
        async with httpx.AsyncClient(base_url=URL, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/generate", json=r) for r in reqs))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 24
    assert responses[11].json()["texts"] == alone
    stats = handle("policy").stats.remote().result()
    assert stats["requests"] == 24 and stats["max_batch_requests"] > 1, stats
    assert stats["batches"] < 24


# ----------------------------------------------------------------------------- bad input


def _detail(r: httpx.Response):
    return r.json()["detail"]


def test_bad_inputs_get_4xx_with_reasons_and_break_nothing(client, cfg):
    before = replicas(cfg)
    post = client.post
    # size limits: 413 with the limit
    r = post("/v1/score", content=b'{"prompt": "' + b"x" * 30_000 + b'", "response": "y"}',
             headers={"content-type": "application/json"})
    assert r.status_code == 413 and _detail(r)["limit_bytes"] == 20_000

    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    r = post("/v1/score", content=chunks(), headers={"content-type": "application/json"})  # no Content-Length
    assert r.status_code == 413 and _detail(r)["error"] == "body_too_large"
    r = post("/v1/generate", json={"model": "base", "prompt": "p" * 2001})
    assert r.status_code == 413 and _detail(r) | {"length": 2001, "limit": 2000, "field": "prompt"} == _detail(r)
    r = post("/v1/score", json={"prompt": "q", "response": "r" * 2001})
    assert r.status_code == 413 and _detail(r)["field"] == "response" and _detail(r)["limit"] == 2000
    r = post("/v1/score/batch", json={"items": [{"prompt": "q", "response": "a"}] * 5})
    assert r.status_code == 413 and _detail(r)["limit"] == 4
    # longer than the context (1024 tokens) but within the field limit: 413 with the model's limit
    r = post("/v1/generate", json={"model": "base", "prompt": "p" * 1500})
    assert r.status_code == 413, r.text
    assert _detail(r)["error"] == "prompt_too_long" and _detail(r)["limit"] == 1024 and _detail(r)["prompt_tokens"] == 1500
    r = post("/v1/score", json={"prompt": "q" * 900, "response": "a" * 900})
    assert r.status_code == 413 and _detail(r)["limit"] == 1024
    r = post("/v1/score/batch", json={"items": [{"prompt": "q", "response": "a"}, {"prompt": "q" * 900, "response": "a" * 900}]})
    assert r.status_code == 413 and _detail(r)["message"].startswith("items[1]")
    # out of range, malformed, unknown: 422
    for body in ({"model": "base", "prompt": "p", "temperature": 9}, {"model": "base", "prompt": "p", "n": 0},
                 {"model": "base", "prompt": "p", "top_p": 0}, {"model": "base", "prompt": "p", "max_new_tokens": 10**6},
                 {"model": "base", "prompt": "p", "seed": -1}, {"model": "base", "prompt": "p", "n": 65},
                 {"model": "base", "prompt": "p", "max_tokens": 3}, {"model": "base", "prompt": 7},
                 {"model": "base", "prompt": [{"role": "wizard", "content": "x"}]}, {"model": "base", "prompt": []},
                 {"model": "base"}, {"prompt": "p"}):
        r = post("/v1/generate", json=body)
        assert r.status_code == 422, (body, r.status_code, r.text)
    r = post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert post("/v1/score", json={"prompt": "q"}).status_code == 422
    assert post("/v1/score/batch", json={"items": []}).status_code == 422
    r = post("/v1/score", json={"prompt": "q", "response": "a", "dimension": "style"})
    assert r.status_code == 422 and "unknown dimension" in _detail(r)["message"]
    # unknown model: 404 naming what exists
    r = post("/v1/generate", json={"model": "gpt-9", "prompt": "p"})
    assert r.status_code == 404 and set(_detail(r)["models"]) == {"old", "base", "policy"}
    assert client.get("/v1/score").status_code == 405
    # nothing crashed or restarted, and good requests still work
    assert replicas(cfg) == before
    assert post("/v1/generate", json={"model": "base", "prompt": "ok", "max_new_tokens": 3}).status_code == 200


def test_handle_api_including_streams_and_errors(app, model_dirs):
    from tso.engines import EngineInputError, PromptTooLongError

    out = handle("model-old").generate.remote({"prompt": "hi", "seed": 5, "max_new_tokens": 6,
                                               "temperature": 1.0}).result()
    assert out["model"] == "old" and out["checkpoint"] == model_dirs["old"] and len(out["texts"]) == 1
    stream = handle("model-old").options(stream=True).generate_stream.remote(
        {"prompt": "hi", "seed": 5, "max_new_tokens": 6, "temperature": 1.0, "request_id": "0", "idx_in_batch": 0})
    assert list(stream) == [out]
    info = handle("policy").info.remote().result()
    assert {"name", "version", "size", "role", "checkpoint"} <= set(info) and info["role"] == "policy"
    with pytest.raises(EngineInputError):
        handle("model-old").generate.remote({"prompt": "hi", "temperature": -1}).result()
    with pytest.raises(PromptTooLongError) as err:
        handle("judge").score.remote({"prompt": "q" * 2000, "response": "a"}).result()
    assert err.value.limit == 1024
    # many requests in one call: the same answers, in order, as one call each
    reqs = [{"prompt": f"hi {i}", "seed": i, "max_new_tokens": 6, "temperature": 1.0} for i in range(5)]
    many = handle("model-old").generate_many.remote(reqs).result()
    assert many == [handle("model-old").generate.remote(r).result() for r in reqs]
    scores = [{"prompt": f"{i}+1?", "response": str(i + 1)} for i in range(3)]
    assert handle("judge").score_many.remote(scores).result() == [handle("judge").score.remote(r).result()
                                                                  for r in scores]
    with pytest.raises(EngineInputError):
        handle("model-old").generate_many.remote([reqs[0], {"prompt": "hi", "temperature": -1}]).result()


# ----------------------------------------------------------------------------- hot-swap


def test_policy_hot_swap_under_load(app, cfg, model_dirs):
    from tso.serving.app import swap_checkpoint

    before = replicas(cfg)
    req = {"model": "policy", "prompt": "stage prompt", "temperature": 0.8, "top_p": 1.0, "seed": 5, "max_new_tokens": 10}
    swapped = threading.Event()

    async def load():
        results = []
        async with httpx.AsyncClient(base_url=URL, timeout=120) as c:
            async def worker():
                after = 0
                while after < 3:  # keep going until three answers after the swap returned
                    r = await c.post("/v1/generate", json=req)
                    results.append((r.status_code, r.json()))
                    after += swapped.is_set()
            await asyncio.gather(*(worker() for _ in range(4)))
        return results

    def swap():
        swap_checkpoint(cfg, model_dirs["stage1"])
        swapped.set()

    t = threading.Thread(target=swap)
    t.start()
    results = asyncio.run(load())
    t.join()
    assert all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:3]
    seen = [body["checkpoint"] for _, body in results]
    assert seen[0] == model_dirs["base"] and seen[-1] == model_dirs["stage1"]
    old_text = local_text(model_dirs["base"], req["prompt"], temperature=0.8, seed=5, max_new_tokens=10)
    new_text = local_text(model_dirs["stage1"], req["prompt"], temperature=0.8, seed=5, max_new_tokens=10)
    assert old_text != new_text
    for _, body in results:  # every answer is the text of the checkpoint it reports
        assert body["texts"] == (new_text if body["checkpoint"] == model_dirs["stage1"] else old_text)
    assert replicas(cfg) == before  # reconfigured in place: no replica restarted
    models = {m["name"]: m for m in httpx.get(f"{URL}/v1/models").json()["data"]}
    assert models["policy"]["checkpoint"] == model_dirs["stage1"] and models["policy"]["weight_version"] == 1
    assert models["old"]["checkpoint"] == model_dirs["old"]  # the other deployments kept their weights


def test_trained_judge_swapped_in_scores_parse(app, cfg, model_dirs, client):
    from tso.serving.app import swap_checkpoint

    swap_checkpoint(cfg, model_dirs["judge"], deployment="judge")
    r = client.post("/v1/score", json={"prompt": "What is 2+2?", "response": "4"})
    out = r.json()
    assert out["checkpoint"] == model_dirs["judge"]
    assert [(d["dimension"], d["score"]) for d in out["dimensions"]] == [("correctness", 7.0), ("conciseness", 3.0)]
    assert out["score"] == pytest.approx(5.0) and out["reason"] is None
    one = client.post("/v1/score", json={"prompt": [{"role": "user", "content": "2+2?"}], "response": "4",
                                         "dimension": "conciseness"}).json()
    assert one["score"] == 3.0 and one["evidence"] == "short" and one["raw"] == JUDGE_ANSWERS["conciseness"]
    batch = client.post("/v1/score/batch", json={"items": [{"prompt": "a", "response": "b", "dimension": "correctness"},
                                                           {"prompt": "c", "response": "d"}]}).json()["results"]
    assert [b["score"] for b in batch] == [7.0, pytest.approx(5.0)]
    stream = handle("judge").options(stream=True).score_stream.remote({"prompt": "a", "response": "b"})
    assert [s["score"] for s in stream] == [pytest.approx(5.0)]
    judge = {m["name"]: m for m in client.get("/v1/models").json()["data"]}["judge"]
    assert judge["uncorrected"] is False and judge["checkpoint"] == model_dirs["judge"]


# ----------------------------------------------------------------------------- auth


def test_bearer_token_auth_on_and_off(app, cfg, model_dirs, monkeypatch):
    from tso.serving.app import deploy, served_checkpoints

    before = replicas(cfg)
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    deploy(cfg, checkpoints=served_checkpoints(cfg), port=PORT)  # only the ingress changes
    body = {"model": "old", "prompt": "p", "max_new_tokens": 2}
    with httpx.Client(base_url=URL, timeout=120) as c:
        assert c.post("/v1/generate", json=body).status_code == 401
        assert c.post("/v1/generate", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Basic s3cret-token"}).status_code == 401
        assert c.post("/v1/score", json={"prompt": "q", "response": "a"}).status_code == 401
        ok = c.post("/v1/generate", json=body, headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200  # liveness stays open
    assert replicas(cfg) == before  # the model deployments were not restarted
    monkeypatch.delenv(TOKEN_ENV)
    deploy(cfg, checkpoints=served_checkpoints(cfg), port=PORT)
    with httpx.Client(base_url=URL, timeout=120) as c:
        assert c.post("/v1/generate", json=body).status_code == 200
    assert served_checkpoints(cfg)["policy"] == model_dirs["stage1"]  # redeploys kept the swapped weights


def test_registering_a_stage_policy_restarts_no_replica(app, cfg, model_dirs, client):
    """What `tso run` does after each stage: the policy joins the matrix as the newest version and becomes
    the base. Roles, versions and weights are user_config, so only the new deployment starts."""
    from tso.run.pipeline import register_policy
    from tso.serving.app import deploy, served_checkpoints
    from tso.serving.client import deployment_name

    before, served = replicas(cfg), served_checkpoints(cfg)
    staged = register_policy(cfg, 1, model_dirs["stage1"])
    deploy(staged, checkpoints={"judge": served["judge"]}, port=PORT)
    try:
        after = replicas(staged)
        assert {k: after[k] for k in before} == before  # nothing restarted
        # the old base is a negative now and gets its deployment; tso-1 is served by the policy deployment
        assert set(after) - set(before) == {deployment_name("base")}
        models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
        assert "tso-1" not in models and models["policy"]["base"] == "tso-1"
        assert models["base"]["role"] == "negative" and models["base"]["version"] == 1
        assert models["old"]["role"] == "negative"
        assert models["policy"]["checkpoint"] == model_dirs["stage1"] and models["policy"]["base"] == "tso-1"
        assert models["judge"]["checkpoint"] == model_dirs["judge"]
    finally:
        deploy(cfg, checkpoints=served, port=PORT)
    assert replicas(cfg) == before  # and back: model-base removed, the others reconfigured


# ----------------------------------------------------------------------------- the Serve config file


def test_deployments_yaml_names_a_real_builder_and_the_demo_app(tmp_path, monkeypatch):
    """deployments/demo.yaml parses as a Serve config, its import path is the builder, its app name is the
    one `tso serve builtin:demo` gives its app, and without a built zoo the builder says which model to build how."""
    import importlib

    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from tso.config import ConfigError, builtin_config_path, load_config

    spec = ServeDeploySchema.model_validate(
        yaml.safe_load((REPO / "deployments" / "demo.yaml").read_text()))
    [app] = spec.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert app.args == {"config": "builtin:demo"}
    assert app.name == load_config(builtin_config_path("demo")).settle_app_name("serve")
    monkeypatch.setenv("TSO_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(ConfigError, match="tso zoo build"):
        builder(app.args)
    with pytest.raises(ValueError, match="unknown args"):
        builder({"config": "builtin:demo", "port": 1})
    assert isinstance(builder({"config": str(_write_tiny_config(tmp_path))}), Application)


def _write_tiny_config(tmp_path):
    from tso.toyworld.tokenizer import build_tokenizer
    from tso.zoo.tiny import random_tiny_llama, save_model_dir

    tok = build_tokenizer()
    for name in ("a", "b"):
        save_model_dir(random_tiny_llama(tok, seed=0, hidden=16, layers=1, heads=2), tok, tmp_path / name)
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"matrix:\n  base: b\n  models:\n"
        f"    - {{name: a, path: {tmp_path / 'a'}, version: 0, size: 1}}\n"
        f"    - {{name: b, path: {tmp_path / 'b'}, version: 1, size: 1}}\n")
    return path


def test_deployment_options_follow_the_resource_config():
    """Placement and batching admission come from the run config (no cluster needed)."""
    from tso.config import ResourceConfig
    from tso.serving.app import _options

    engine = EngineConfig(max_batch_size=48, torch_threads=2)
    opts = _options("judge", engine, ResourceConfig(num_cpus=0.5, num_gpus=1, num_replicas=3, max_ongoing_requests=8),
                    {"checkpoint": "/ckpt"}, max_queued=100)
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["max_queued_requests"] == 100  # a full deployment refuses (503) instead of queueing without end
    assert opts["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}  # with Retry-After
    assert opts["max_ongoing_requests"] == 48  # raised to max_batch_size, or batches could never fill
    assert opts["ray_actor_options"]["num_cpus"] == 0.5 and opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    assert opts["user_config"] == {"checkpoint": "/ckpt"}
    auto = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}
    opts = _options("judge", engine, ResourceConfig(autoscaling=auto), {"checkpoint": "/ckpt"}, max_queued=100)
    assert opts["autoscaling_config"] == auto and "num_replicas" not in opts
    assert "placement_group_bundles" not in opts and "accelerator_type" not in opts["ray_actor_options"]
    tp = ResourceConfig(num_gpus=0, accelerator_type="H100", placement_group_bundles=[{"CPU": 1, "GPU": 1}, {"GPU": 1}])
    opts = _options("policy", EngineConfig(kind="vllm", tensor_parallel_size=2), tp, {"checkpoint": "/ckpt"}, 100)
    assert opts["ray_actor_options"]["accelerator_type"] == "H100"
    assert opts["placement_group_bundles"] == [{"CPU": 1, "GPU": 1}, {"GPU": 1}] and opts["placement_group_strategy"] == "PACK"


def test_build_app_checks_names_and_directories(tmp_path):
    from tso.config import load_config
    from tso.serving.app import build_app

    cfg = load_config(_write_tiny_config(tmp_path))
    with pytest.raises(ValueError, match="unknown deployments"):
        build_app(cfg, include=["judge", "model-zz"])
    with pytest.raises(FileNotFoundError, match="policy"):
        build_app(cfg, checkpoints={"policy": str(tmp_path / "missing")})
    cfg.matrix.models[0].path = str(tmp_path / "gone")
    with pytest.raises(ValueError, match="no model directory"):
        build_app(cfg, include=["judge"])


def test_judge_replica_killed_under_load_every_request_is_answered(app, cfg):
    """kill -9 of the judge's replica while 16 clients score: Serve starts a new one, the ingress sends
    the calls the dead replica held again, and all 16 get their 200 with the scores a quiet run gives."""
    import signal

    from ray import serve

    items = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(2)]
    with httpx.Client(base_url=URL, timeout=300) as c:
        quiet = c.post("/v1/score/batch", json={"items": items}).json()
    victim = [serve.get_deployment_handle("judge", APP).info.remote().result()["pid"]]
    before = replicas(cfg)["judge"]

    async def load():
        async with httpx.AsyncClient(base_url=URL, timeout=300) as c:
            calls = [asyncio.create_task(c.post("/v1/score/batch", json={"items": items})) for _ in range(16)]
            await asyncio.sleep(0.3)  # the requests are in flight
            await asyncio.get_running_loop().run_in_executor(None, os.kill, victim[0], signal.SIGKILL)
            return await asyncio.gather(*calls)

    answers = asyncio.run(load())
    assert [r.status_code for r in answers] == [200] * 16, [(r.status_code, r.text[:200]) for r in answers]
    assert all(r.json() == quiet for r in answers)  # greedy, seeded: the same scores as before the kill
    assert replicas(cfg)["judge"] != before  # it was a new replica that answered
