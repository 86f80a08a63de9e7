"""Training at real-model scale on tiny models: gradient checkpointing, train.deepspeed overrides, ZeRO-3
with 2 CPU workers (partitioned load, reference log-probs, boundary checkpoint, resume, export gathered
from the partitions), LoRA, and `tso train --plan` against DeepSpeed's own estimators.

The 2-worker runs start two plain processes that form a gloo process group (RANK/WORLD_SIZE/MASTER_*),
as Ray Train's workers do, without Ray: ``python -m tests.train.test_scale worker SPEC``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, max_weight_diff, model_weights
from tests.toydata import arithmetic_pairs, write_pairs
from tso.config import ConfigError, TrainConfig, parse_config
from tso.train.metrics import read_kind, read_steps

pytestmark = pytest.mark.timeout(300)


def _train(**over) -> TrainConfig:
    base = dict(minibatches=2, epochs=2, global_batch=8, micro_batch=4, num_workers=1, max_length=64, seed=7,
                optimizer={"lr": 2e-3, "warmup_ratio": 0.1}, loss={"type": "dpo"})
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return TrainConfig.model_validate(base)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_pairs(arithmetic_pairs(48, seed=1), tmp_path_factory.mktemp("scale_pairs") / "pairs.parquet")


def _load(train: TrainConfig, model_dir: Path, backend: str = "torch"):
    from tso.train.stage import load_model_and_tokenizer

    return load_model_and_tokenizer(str(model_dir), train, backend=backend)


def _batch(model_dir: Path, pairs_file: Path, tokenizer, n: int = 4):
    from tso.train.data import collate_pair_batch, read_pairs, tokenize_pairs

    pairs, _ = tokenize_pairs(read_pairs(pairs_file), tokenizer, 64)
    return pairs, collate_pair_batch(pairs, list(range(n)), tokenizer.pad_token_id)


def _steps_by_minibatch(metrics_path) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in read_steps(metrics_path):
        out.setdefault(r["minibatch"], []).append(r)
    return out


# ----------------------------------------------------------------------------- gradient checkpointing


def _count_checkpointed(model) -> list[int]:
    """Wrap every decoder layer's checkpoint function with a counter (transformers calls it per layer)."""
    calls = [0]
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            real = m._gradient_checkpointing_func

            def counted(*a, _real=real, **k):
                calls[0] += 1
                return _real(*a, **k)

            m._gradient_checkpointing_func = counted
    return calls


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_skips_the_reference_pass(
        tiny_model_dir, pairs_file):
    from tso.method.logprobs import pair_logprobs
    from tso.method.losses import preference_loss
    from tso.train.reference import reference_logprobs

    results = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model, tok = _load(_train(gradient_checkpointing=ckpt), tiny_model_dir)
        pairs, batch = _batch(tiny_model_dir, pairs_file, tok)
        calls = _count_checkpointed(model)
        ref = reference_logprobs(model, pairs, list(range(8)), tok.pad_token_id, batch_pairs=4)
        assert calls[0] == 0  # eval mode, no gradients: the reference pass runs without checkpointing
        model.train()
        chosen, rejected = pair_logprobs(model, batch)
        ref_c = torch.tensor([ref[pairs[i].id][0] for i in range(4)]) - 0.3  # a reference that differs
        ref_r = torch.tensor([ref[pairs[i].id][1] for i in range(4)]) + 0.2
        loss, _ = preference_loss(_train().loss, chosen, rejected, ref_c, ref_r)
        loss.backward()
        assert calls[0] == (model.config.num_hidden_layers if ckpt else 0)  # each layer ran under checkpoint()
        results[ckpt] = (float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, ref,
                         model.config.use_cache)
    (l0, g0, r0, _), (l1, g1, r1, cache1) = results[False], results[True]
    assert cache1 is False
    assert l1 == pytest.approx(l0, abs=1e-6) and l0 != pytest.approx(math.log(2), abs=1e-3)
    assert g0.keys() == g1.keys() and max(float((g0[k] - g1[k]).abs().max()) for k in g0) < 1e-6
    assert max(float(g.abs().max()) for g in g0.values()) > 1e-4  # the gradients compared are not all zero
    assert r0 == r1


# ----------------------------------------------------------------------------- train.deepspeed


def _cfg(train: dict) -> dict:
    models = [{"name": "a", "path": "/m", "version": 1, "size": 1}, {"name": "b", "path": "/m", "version": 0, "size": 1},
              {"name": "c", "path": "/m", "version": 2, "size": 2}]
    return {"matrix": {"base": "a", "models": models},
            "train": {"global_batch": 8, "micro_batch": 4, **train}}


def test_deepspeed_override_merges_over_the_generated_config_and_passes_other_keys_through():
    from tso.train.deepspeed_config import deepspeed_config, offload_devices

    over = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                  "stage3_prefetch_bucket_size": 1000},
            "train_batch_size": 8, "gradient_clipping": 1, "communication_data_type": "fp32"}
    cfg = parse_config(_cfg({"zero_stage": 3, "deepspeed": over}))
    ds = deepspeed_config(cfg.train)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                       "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                       "stage3_prefetch_bucket_size": 1000}
    assert ds["communication_data_type"] == "fp32" and ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"] == {"enabled": False} and offload_devices(ds) == (True, False)
    assert deepspeed_config(parse_config(_cfg({})).train)["zero_optimization"]["stage"] == 2  # default untouched
    from tso.train.judge_sft import judge_train_config

    judge = judge_train_config(cfg)  # the judge has its own batch sizes: the policy's repeated ones do not apply
    assert judge.global_batch == 32 and "train_batch_size" not in judge.deepspeed
    assert deepspeed_config(judge)["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize("train, field, owner", [
    ({"zero_stage": 2, "deepspeed": {"zero_optimization": {"stage": 3}}}, "zero_optimization.stage", "train.zero_stage"),
    ({"deepspeed": {"train_batch_size": 16}}, "train_batch_size", "train.global_batch"),
    ({"deepspeed": {"train_micro_batch_size_per_gpu": 2}}, "train_micro_batch_size_per_gpu", "train.micro_batch"),
    ({"deepspeed": {"gradient_accumulation_steps": 4}}, "gradient_accumulation_steps", "train.global_batch"),
    ({"deepspeed": {"bf16": {"enabled": True}}}, "bf16.enabled", "train.use_gpu"),
    ({"use_gpu": True, "deepspeed": {"fp16": {"enabled": True}}}, "fp16.enabled", "train.use_gpu"),
    ({"deepspeed": {"gradient_clipping": 0.5}}, "gradient_clipping", "train.optimizer.grad_clip"),
    ({"deepspeed": {"optimizer": {"type": "Adam"}}}, "optimizer", "train.optimizer"),
    ({"deepspeed": {"scheduler": {"type": "WarmupLR"}}}, "scheduler", "train.optimizer"),
])
def test_deepspeed_override_contradicting_a_typed_setting_is_a_config_error_naming_both(train, field, owner):
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(train), source="run.yaml")
    msg = str(e.value)
    assert msg.startswith("run.yaml: train: ") and f"train.deepspeed.{field}" in msg and owner in msg


def test_deepspeed_override_is_checked_again_at_the_real_world_size_and_model_settings_are_preflighted():
    from tso.train.deepspeed_config import deepspeed_config
    from tso.train.stage import check_model_settings

    t = parse_config(_cfg({"deepspeed": {"gradient_accumulation_steps": 2}})).train  # right for 1 worker
    assert deepspeed_config(t, world_size=1)["gradient_accumulation_steps"] == 2
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps = 2 contradicts .*tso sets 1"):
        deepspeed_config(t, world_size=2)
    with pytest.raises(ConfigError, match="flash_attention_2 needs train.use_gpu"):
        parse_config(_cfg({"attn_implementation": "flash_attention_2"}))
    with pytest.raises(ConfigError, match=r"train.attn_implementation: Input should be 'sdpa', 'eager'"):
        parse_config(_cfg({"attn_implementation": "flash"}))
    with pytest.raises(ConfigError, match=r"train.lora.target_modules: .*name at least one module"):
        parse_config(_cfg({"lora": {"target_modules": []}}))
    fa2 = parse_config(_cfg({"use_gpu": True, "attn_implementation": "flash_attention_2"})).train
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="needs the flash-attn package"):
            check_model_settings(fa2)
        from tso.train.ray_trainer import preflight_judge, preflight_policy

        # the driver's preflights say so before they look for a model or a pairs file
        with pytest.raises(ValueError, match="needs the flash-attn package"):
            preflight_policy(fa2, "/nowhere/pairs.parquet", "/nowhere/model", 1)
        with pytest.raises(ValueError, match="needs the flash-attn package"):
            preflight_judge(fa2, "/nowhere/feedback.jsonl", "/nowhere/model", None)
    check_model_settings(parse_config(_cfg({"lora": {"r": 4}})).train)  # peft is installed: no error


def test_model_loads_in_the_training_dtype_with_the_configured_attention(tiny_model_dir):
    from tso.train.stage import training_dtype

    assert training_dtype(_train(), "deepspeed") == torch.float32  # CPU: fp32
    gpu = _train(use_gpu=True)
    assert training_dtype(gpu, "deepspeed") == torch.bfloat16 and training_dtype(gpu, "torch") == torch.float32
    model, _ = _load(_train(attn_implementation="eager"), tiny_model_dir)
    assert model.config._attn_implementation == "eager" and next(model.parameters()).dtype == torch.float32
    model, _ = _load(_train(), tiny_model_dir)
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- 2 workers without Ray


def worker_main(spec: dict) -> None:
    """One rank of a 2-process DeepSpeed run: records how much of the model this rank held right after
    loading, trains, and merges its boundary checkpoints into ``ckpt_root`` (as Ray Train does)."""
    import tso.train.stage as stage

    torch.set_num_threads(1)
    real_load = stage.load_model_and_tokenizer

    def recording_load(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)
        held = sum(p.numel() for p in model.parameters())
        full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        Path(spec["out"]).mkdir(parents=True, exist_ok=True)
        Path(spec["out"], f"load_rank{stage.dist.rank()}.json").write_text(json.dumps({"held": held, "full": full}))
        return model, tok

    stage.load_model_and_tokenizer = recording_load
    root = Path(spec["ckpt_root"])

    def report(metrics, ckpt_dir):
        if ckpt_dir is not None:
            shutil.copytree(ckpt_dir, root / f"boundary_{metrics['boundary']:02d}", dirs_exist_ok=True)

    job = stage.PolicyJob(train=spec["train"], pairs_path=spec["pairs"], base_path=spec["base"], out_dir=spec["out"],
                          stage=1, config_hash="test", backend="deepspeed", threads=1)
    stage.run_policy_worker(job, report=report, resume_dir=spec.get("resume"), log=None)


def run_two_workers(tmp: Path, spec: dict, timeout: int = 400) -> None:
    """Both ranks, to the end (about 25 s each on an idle 2-core machine; the timeout is for a busy one)."""
    from tso.train.backend import free_port

    port = str(free_port())
    name = Path(spec["out"]).name
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        log = open(tmp / f"{name}_rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "tests.train.test_scale", "worker", json.dumps(spec)],
                                       env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log))
    timed_out = False
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    for rank, (p, _) in enumerate(procs):
        tail = (tmp / f"{name}_rank{rank}.log").read_text()[-4000:]
        assert not timed_out and p.returncode == 0, f"rank {rank} (timed out: {timed_out}):\n{tail}"


# ----------------------------------------------------------------------------- ZeRO-3, 2 workers


ZERO3 = dict(zero_stage=3, num_workers=2, gradient_checkpointing=True, keep_checkpoints=2)
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory, pairs_file, tiny_model_dir):
    """Run A: ZeRO-3 + LoRA on 2 workers with gradient checkpointing, uninterrupted, keeping its boundary
    checkpoints; run B: the same, resumed from A's first boundary; the same training in one process on
    the plain torch backend (1 worker, the same 8-pair steps as 2 x 4). One pair of runs covers ZeRO-3
    and LoRA under it: each 2-worker run costs about half a minute idle and several under CI's load."""
    from tso.train.stage import PolicyJob, train_policy_local

    tmp = tmp_path_factory.mktemp("zero3")
    train = _train(**ZERO3, lora=LORA, optimizer={"lr": 1e-2})
    spec = {"train": train.model_dump(mode="json"), "pairs": str(pairs_file), "base": str(tiny_model_dir)}
    a = {**spec, "out": str(tmp / "a"), "ckpt_root": str(tmp / "a_ckpts")}
    run_two_workers(tmp, a)
    b = {**spec, "out": str(tmp / "b"), "ckpt_root": str(tmp / "b_ckpts"), "resume": str(tmp / "a_ckpts" / "boundary_01")}
    run_two_workers(tmp, b)
    one = _train(keep_checkpoints=2, lora=LORA, optimizer={"lr": 1e-2})
    plain = train_policy_local(PolicyJob(train=one.model_dump(mode="json"), pairs_path=str(pairs_file),
                                         base_path=str(tiny_model_dir), out_dir=str(tmp / "plain"),
                                         config_hash="test", backend="torch"), log=None)
    return tmp, plain


@pytest.mark.timeout(900)
def test_zero3_lora_two_workers_load_partitioned_and_train_as_one_process(zero3_runs, pairs_file, tiny_model_dir):
    tmp, plain = zero3_runs
    for rank in (0, 1):  # right after loading, before the engine: each rank holds a partition, not the model
        held = json.loads((tmp / "a" / f"load_rank{rank}.json").read_text())
        assert held["full"] > 100_000 and held["held"] < held["full"] / 2
    a_steps, p_steps = read_steps(tmp / "a" / "metrics.jsonl"), read_steps(plain.metrics_path)
    assert len(a_steps) == len(p_steps) == 2 * 2 * 3
    assert [r["loss"] for r in a_steps] == pytest.approx([r["loss"] for r in p_steps], abs=1e-4)
    assert min(r["loss"] for r in a_steps) < math.log(2) - 0.005  # the adapters learn
    # reference log-probs at the boundary: computed by the 2 partitioned workers, as by the one process
    from tso.train.checkpoint import read_reference

    mb, ref = read_reference(tmp / "a_ckpts" / "boundary_01")
    mb_plain, ref_plain = read_reference(Path(plain.out_dir) / "checkpoints" / "stage1_boundary_01")
    assert mb == mb_plain == 2 and ref.keys() == ref_plain.keys() and len(ref) == 24
    assert max(abs(ref[i][j] - ref_plain[i][j]) / max(1.0, abs(ref_plain[i][j])) for i in ref for j in (0, 1)) < 1e-4
    from tests.tools.verify_reference import check_reference

    checked = check_reference(tmp / "a_ckpts" / "boundary_01", pairs_file)
    assert checked["max_abs_diff"] < 1e-4  # ... and they are the exported boundary policy's own
    assert len(read_kind(tmp / "a" / "metrics.jsonl", "reference")) == 2
    # the export: a full HF directory gathered from the partitions, equal to the one-process policy
    from transformers import AutoModelForCausalLM

    exported = model_weights(tmp / "a" / "policy")
    assert max_weight_diff(exported, model_weights(Path(plain.policy_dir))) < 1e-4
    model = AutoModelForCausalLM.from_pretrained(str(tmp / "a" / "policy"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
    # merged LoRA: the base's own keys, moved by the adapters
    assert max_weight_diff(exported, model_weights(tiny_model_dir)) > 1e-4 and not any("lora" in k for k in exported)
    assert max_weight_diff(model_weights(tmp / "a_ckpts" / "boundary_01" / "policy"),
                     model_weights(Path(plain.out_dir) / "checkpoints" / "stage1_boundary_01" / "policy")) < 1e-4


def test_zero3_lora_two_workers_resume_from_a_boundary_checkpoint(zero3_runs):
    tmp, _ = zero3_runs
    summary = json.loads((tmp / "b" / "summary.json").read_text())
    assert summary["resumed_from"] == 1 and summary["steps"] == 12
    b_steps = read_steps(tmp / "b" / "metrics.jsonl")
    a_steps = read_steps(tmp / "a" / "metrics.jsonl")
    assert [r["step"] for r in b_steps] == list(range(7, 13))  # mini-batch 1 was not redone
    assert [r["loss"] for r in b_steps] == pytest.approx([r["loss"] for r in a_steps[6:]], abs=1e-6)
    assert b_steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the stored reference of mini-batch 2
    assert max_weight_diff(model_weights(tmp / "b" / "policy"), model_weights(tmp / "a" / "policy")) < 1e-6


# ----------------------------------------------------------------------------- LoRA


def test_lora_trains_only_the_adapters_and_the_reference_is_the_adapted_policy(tmp_path, tiny_model_dir, pairs_file):
    from tso.train.backend import TorchBackend
    from tso.train.data import read_pairs, tokenize_pairs
    from tso.train.metrics import MetricsLog
    from tso.train.minibatch import plan_stage, run_minibatch_dpo

    train = _train(lora=LORA, optimizer={"lr": 1e-2}, minibatches=2, epochs=3)
    model, tok = _load(train, tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(float(before[k].abs().max()) == 0 for k in before if "lora_B" in k)  # peft starts B at 0
    pairs, _ = tokenize_pairs(read_pairs(pairs_file), tok, 64)
    plan = plan_stage(len(pairs), train, 1)
    backend = TorchBackend(model, train, plan.total_steps)
    assert {id(p) for g in backend.optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in model.parameters() if p.requires_grad}
    log = tmp_path / "metrics.jsonl"
    run_minibatch_dpo(backend, pairs, train, pad_id=tok.pad_token_id, stage=1, plan=plan, checkpoints=False, log=None,
                      metrics=MetricsLog(log))
    after = model.state_dict()
    frozen = [k for k in before if "lora_" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # the base did not move
    assert all(float(after[k].abs().max()) > 0 for k in after if "lora_B" in k)
    by_mb = _steps_by_minibatch(log)
    for rs in by_mb.values():  # each mini-batch starts against the policy as it is: loss log 2, h = 0
        assert rs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rs[0]["grad_scale"] == pytest.approx(0.5, abs=1e-5)
    last = by_mb[1][-4:]
    assert sum(r["loss"] for r in last) / len(last) < math.log(2) - 0.02  # the adapters learn
    assert len(read_kind(log, "reference")) == 2


def test_lora_exports_merged_by_default_and_adapter_on_request(tmp_path, tiny_model_dir, pairs_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tso.train.export import save_hf_model

    model, tok = _load(_train(lora={**LORA, "target_modules": "all-linear"}), tiny_model_dir)
    with torch.no_grad():  # adapters that change the model (peft starts B at zero)
        g = torch.Generator().manual_seed(3)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    _, batch = _batch(tiny_model_dir, pairs_file, tok)
    with torch.no_grad():
        want = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        base_logits = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert float((want - base_logits).abs().max()) > 1e-3
    save_hf_model(model, tmp_path / "merged", tok, lineage={"kind": "policy"})
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert set(model_weights(tmp_path / "merged")) == set(model_weights(tiny_model_dir))  # the base's own keys, no lora_
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert (tmp_path / "merged" / "lineage.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    save_hf_model(model, tmp_path / "adapter", tok, lora_export="adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                        str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got_adapter = adapted(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert float((got - want).abs().max()) < 1e-5 and float((got_adapter - want).abs().max()) < 1e-5


def test_lora_stage_boundary_checkpoint_holds_the_merged_policy_that_made_its_reference(tmp_path, tiny_model_dir,
                                                                                       pairs_file):
    from tests.tools.verify_reference import check_reference
    from tso.train.stage import PolicyJob, train_policy_local

    train = _train(lora=LORA, optimizer={"lr": 1e-2}, keep_checkpoints=2)
    res = train_policy_local(PolicyJob(train=train.model_dump(mode="json"), pairs_path=str(pairs_file),
                                       base_path=str(tiny_model_dir), out_dir=str(tmp_path / "run"),
                                       config_hash="test", backend="torch"), log=None)
    lineage = json.loads((Path(res.policy_dir) / "lineage.json").read_text())
    assert lineage["lora"]["r"] == 4 and not (Path(res.policy_dir) / "adapter_config.json").exists()
    checked = check_reference(Path(res.out_dir) / "checkpoints" / "stage1_boundary_01", pairs_file, tiny_model_dir)
    # the stored reference of mini-batch 2 is the adapted policy's at boundary 1, not the base model's
    assert checked["max_abs_diff"] < 1e-4 and checked["mean_abs_diff_base"] > 1e-3


# ----------------------------------------------------------------------------- --plan


SMALL_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
               "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 3,
               "vocab_size": 5000, "max_position_embeddings": 1024, "tie_word_embeddings": False}
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False}


def _plan_cli(config_dir: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tso.cli", "train", "builtin:demo", "--plan", "--json", "--base",
                           str(config_dir), *args], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_plan_model_states_equal_deepspeeds_estimators(tmp_path):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from transformers import AutoModelForCausalLM, LlamaConfig

    (tmp_path / "config.json").write_text(json.dumps(SMALL_LLAMA))
    real = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL_LLAMA))  # real tensors: DeepSpeed's own count
    total, largest = model_to_params(real)
    common = ["--set", "train.num_workers=8", "--set", "train.use_gpu=true", "--set", "train.global_batch=64",
              "--set", "train.micro_batch=2", "--set", "train.max_length=512", "--num-pairs", "1000"]
    from tso.train.plan import make_plan, read_model_config

    z2 = make_plan(_train(num_workers=8, use_gpu=True, global_batch=64, micro_batch=2, max_length=512, zero_stage=2),
                   read_model_config(tmp_path / "config.json"), num_pairs=1000).to_dict()
    assert z2["model"]["total_params"] == total and z2["model"]["largest_layer_params"] == largest
    cpu, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=8, num_nodes=1, cpu_offload=False)
    assert (z2["model_states"]["gpu_bytes"], z2["model_states"]["cpu_bytes_per_node"]) == (gpu, cpu)
    z3 = _plan_cli(tmp_path, *common, "--gpus-per-node", "4", "--set", "train.zero_stage=3", "--set",
                   "train.deepspeed={zero_optimization: {offload_optimizer: {device: cpu}}}")
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=4, num_nodes=2,
                                                        cpu_offload=True, cpu_offload_params=False, zero_init=True)
    assert (z3["model_states"]["gpu_bytes"], z3["model_states"]["cpu_bytes_per_node"]) == (gpu, cpu)
    assert z3["setup"]["nodes"] == 2 and z3["model_states"]["offload_optimizer"] is True
    # activations: checkpointing keeps less; the steps are the trainer's own plan
    acts = z3["activations"]
    assert 0 < acts["with_checkpointing_bytes"] < acts["without_checkpointing_bytes"]
    assert acts["sequences"] == 4 and acts["seq_len"] == 512
    assert z3["steps"]["minibatch_sizes"] == [334, 333, 333] and z3["steps"]["steps_per_epoch"] == [5, 5, 5]
    assert z3["steps"]["total_steps"] == 2 * 15 and z3["steps"]["grad_accum"] == 4


def test_plan_for_a_7b_policy_and_lora_counts(tmp_path, pairs_file):
    from transformers import LlamaConfig

    from tso.train.plan import format_plan, make_plan, model_shape

    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    plan = _plan_cli(tmp_path, "--set", "train.num_workers=8", "--set", "train.use_gpu=true", "--set",
                     "train.zero_stage=3", "--set", "train.global_batch=16", "--set", "train.micro_batch=2",
                     "--set", "train.gradient_checkpointing=true", "--pairs", str(pairs_file))
    assert plan["model"]["total_params"] == 6_738_415_616  # Llama-2-7B
    assert plan["steps"]["pairs"] == 48 and plan["per_device"]["gradient_checkpointing"] is True
    assert plan["per_device"]["configured_bytes"] < plan["per_device"]["other_setting_bytes"]
    # LoRA: the adapters are what the optimizer holds (r x (in + out) per targeted Linear)
    lora = TrainConfig.model_validate({**_train().model_dump(), "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}})
    shape = model_shape(LlamaConfig(**SMALL_LLAMA), lora.lora)
    assert shape.trainable_params == 3 * (8 * (256 + 256) + 8 * (256 + 128))
    p = make_plan(lora, LlamaConfig(**SMALL_LLAMA), num_pairs=48)
    assert "LoRA r=8" in format_plan(p) and p.steps["total_steps"] == 2 * 2 * 3
    bad = subprocess.run([sys.executable, "-m", "tso.cli", "train", "builtin:demo", "--plan", "--base",
                          str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert bad.returncode == 2 and "config.json" in bad.stderr and "Traceback" not in bad.stderr


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker_main(json.loads(sys.argv[2]))
