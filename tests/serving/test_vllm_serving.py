"""The policy deployment on vLLM inside a real Serve app (the `vllm` tier): continuous batching, the
in-place swap of a stage's weights under concurrent requests on the same replica, and a refused
swap that keeps the replica serving and says why."""

from __future__ import annotations

import threading

import pytest

from tso.config import parse_config
from tso.models.fixture import smollm2_matrix_section

pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
pytest.importorskip("vllm")

PORT = 18711
APP = "tso-vllm-test"
HF = {"kind": "transformers", "dtype": "bfloat16", "torch_threads": 1}
VLLM = {"kind": "vllm", "dtype": "float32", "max_model_len": 512, "kv_cache_gib": 1}
QUESTIONS = ["What is 2+3?", "Name the capital of France.", "What color is the sky?"]


@pytest.fixture(scope="module")
def cfg(smollm2_home, tmp_path_factory):
    section = smollm2_matrix_section(smollm2_home)
    for m in section["models"]:
        m.update(engine=VLLM if m["name"] == section["base"] else HF, resources={"num_cpus": 0.1})
    return parse_config({"run_dir": str(tmp_path_factory.mktemp("run")), "matrix": section,
                         "judge": {"path": str(smollm2_home / "real" / "smollm2-135m"), "engine": HF},
                         "serve": {"port": PORT, "app_name": APP}})


@pytest.fixture(scope="module")
def app(ray_cluster, cfg):
    from ray import serve

    from tso.serving.app import deploy

    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    deploy(cfg, port=PORT)
    yield cfg
    serve.delete(APP)
    serve.shutdown()


def _greedy_requests() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": q}], "temperature": 0, "max_new_tokens": 20} for q in QUESTIONS]


def _reference(path: str) -> list[str]:
    """What a freshly loaded fp32 engine answers (the transformers engine: exact parity in fp32)."""
    from tso.config import EngineConfig
    from tso.engines import SamplingParams
    from tso.engines.hf import HFEngine

    engine = HFEngine(path, EngineConfig(kind="transformers", dtype="float32"))
    params = [SamplingParams(temperature=0, max_new_tokens=20)] * len(QUESTIONS)
    return [r.texts[0] for r in engine.generate([[{"role": "user", "content": q}] for q in QUESTIONS], params)]


def test_swap_of_a_vllm_policy_in_place_under_load_and_a_refused_swap(app, smollm2_home):
    from tso.serving.app import swap_checkpoint
    from tso.serving.client import ServeClient

    client = ServeClient(APP)
    policy = client.handle("policy")
    info = policy.info.remote().result()
    assert info["engine"] == "vllm" and info["weight_version"] == 0 and info["max_context"] == 512
    old_path, new_path = info["checkpoint"], str(smollm2_home / "real" / "smollm2-121m-v1")
    old, new = _reference(old_path), _reference(new_path)
    assert old != new
    first = policy.generate_many.remote(_greedy_requests()).result()
    assert [r["texts"][0] for r in first] == old and all(r["weight_version"] == 0 for r in first)

    answers, errors, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                answers.extend(policy.generate_many.remote(_greedy_requests()).result())
            except Exception as e:  # noqa: BLE001 - counted below
                errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        swap_checkpoint(app, new_path, port=PORT)
    finally:
        stop.set()
        for t in threads:
            t.join()
    after = policy.info.remote().result()
    assert after["replica"] == info["replica"] and after["checkpoint"] == new_path and after["weight_version"] == 1
    assert not errors and answers
    for i, r in enumerate(answers):  # never a mix: each answer is wholly the old model's or the new one's
        assert r["texts"][0] == (old if r["weight_version"] == 0 else new)[i % 3]
        assert r["checkpoint"] == (old_path if r["weight_version"] == 0 else new_path)
    assert [r["texts"][0] for r in policy.generate_many.remote(_greedy_requests()).result()] == new

    with pytest.raises(RuntimeError, match="another architecture"):
        swap_checkpoint(app, str(smollm2_home / "real" / "smollm2-114m"), port=PORT)
    kept = policy.info.remote().result()
    assert kept["replica"] == info["replica"] and kept["checkpoint"] == new_path and "114m" in kept["load_error"]
    assert [r["texts"][0] for r in policy.generate_many.remote(_greedy_requests()).result()] == new
