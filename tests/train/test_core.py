"""The training core without Ray: data, DeepSpeed config, schedule, the mini-batch loop with the reference
hot-swap, checkpoints and resume, metrics, plot, judge SFT. Real tiny models, real optimizers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, max_weight_diff, model_weights
from tests.toydata import arithmetic_pairs, toy_feedback, write_jsonl, write_pairs
from tso.config import TrainConfig
from tso.train.data import encode_prompt, epoch_steps, read_pairs, shard, split_minibatches, tokenize_pairs
from tso.train.deepspeed_config import WarmupCosine, deepspeed_config
from tso.train.metrics import read_kind, read_records, read_steps
from tso.train.minibatch import plan_stage
from tso.train.stage import PolicyJob, train_policy_local

pytestmark = pytest.mark.timeout(300)


def _train(**over) -> TrainConfig:
    base = dict(minibatches=3, epochs=2, global_batch=8, micro_batch=4, num_workers=1, max_length=64, seed=7,
                optimizer={"lr": 2e-3, "warmup_ratio": 0.1}, loss={"type": "dpo"})
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return TrainConfig.model_validate(base)


def _job(train: TrainConfig, pairs: Path, base: Path, out: Path, backend: str = "torch") -> PolicyJob:
    return PolicyJob(train=train.model_dump(mode="json"), pairs_path=str(pairs), base_path=str(base),
                     out_dir=str(out), stage=1, config_hash="test", backend=backend)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_pairs(arithmetic_pairs(72, seed=1), tmp_path_factory.mktemp("pairs") / "pairs.parquet")


@pytest.fixture(scope="module")
def run_policy(tmp_path_factory, pairs_file, tiny_model_dir):
    """The default run (K=3, E=2, reference = policy, DPO), shared by several tests; it keeps all
    three boundary checkpoints."""
    out = tmp_path_factory.mktemp("run") / "policy_mode"
    return train_policy_local(_job(_train(keep_checkpoints=3), pairs_file, tiny_model_dir, out), log=None)


class Crash(Exception):
    """What a killed process leaves behind, without killing the test: the loop stops mid-step."""


@contextlib.contextmanager
def crash_at_step(n: int):
    """The loop's n-th optimizer step (counted over the whole attempt) raises ``Crash``."""
    import tso.train.minibatch as mb

    real_train_step = mb.train_step
    calls = {"n": 0}

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash()
        return real_train_step(*args, **kwargs)

    mb.train_step = crashing_step
    try:
        yield
    finally:
        mb.train_step = real_train_step


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------------------- data


def test_tokenize_uses_chat_template_appends_eos_and_reports_long_pairs(tiny_tokenizer):
    rows = [
        {"id": "b", "prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"id": "a", "prompt": "é€😀?", "chosen": "ok", "rejected": "no"},
        {"id": "long", "prompt": "x" * 80, "chosen": "y", "rejected": "z"},
        {"id": "chat", "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
         "chosen": "hello", "rejected": "go away"},
        {"id": "bad", "prompt": "p", "chosen": None, "rejected": "r"},
        {"id": "b", "prompt": "dup", "chosen": "1", "rejected": "2"},
    ]
    pairs, rep = tokenize_pairs(rows, tiny_tokenizer, max_length=64)
    assert [p.id for p in pairs] == ["a", "b", "chat"]  # sorted by id, nothing truncated
    assert rep.too_long == ["long"] and rep.kept == 3 and rep.total == 6
    assert {r for _, r in rep.invalid} >= {"duplicate id"} and "bad" in {i for i, _ in rep.invalid}
    eos = tiny_tokenizer.eos_token_id
    b = pairs[1]
    expected = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "1+1="}], add_generation_prompt=True,
                                                  tokenize=True)["input_ids"]
    assert b.prompt == list(expected)
    assert b.chosen == tiny_tokenizer("2", add_special_tokens=False).input_ids + [eos]
    assert tiny_tokenizer.decode(pairs[0].prompt).endswith("é€😀?<|assistant|>")  # bytes round-trip
    assert "<|system|>be brief" in tiny_tokenizer.decode(encode_prompt(tiny_tokenizer, rows[3]["prompt"]))
    assert "1 longer than max_length" in rep.summary() and "long" in rep.summary()


def test_minibatch_split_is_seeded_sorted_by_id_and_sharding_covers_each_step_once():
    a = split_minibatches(50, 3, seed=43, stage=1)
    assert a == split_minibatches(50, 3, seed=43, stage=1)
    assert a != split_minibatches(50, 3, seed=44, stage=1) and a != split_minibatches(50, 3, seed=43, stage=2)
    assert sorted(i for m in a for i in m) == list(range(50)) and sorted(len(m) for m in a) == [16, 17, 17]
    steps, dropped = epoch_steps(a[0], 8, 43, 1, 0, 0)
    assert len(steps) == len(a[0]) // 8 and dropped == len(a[0]) % 8
    for step in steps:
        parts = [shard(step, r, 2) for r in range(2)]
        assert sorted(parts[0] + parts[1]) == sorted(step) and not set(parts[0]) & set(parts[1])
    assert epoch_steps(a[0], 8, 43, 1, 0, 1)[0] != steps  # a new order every epoch


def test_minibatch_smaller_than_one_optimizer_step_is_a_clear_error():
    with pytest.raises(ValueError, match=r"mini-batch \d of 3 has \d+ pairs, fewer than one optimizer step"):
        plan_stage(40, _train(global_batch=16, micro_batch=4), stage=1)
    plan = plan_stage(48, _train(global_batch=16, micro_batch=4), stage=1)
    assert plan.total_steps == 2 * 3 * 1


def test_deepspeed_config_and_schedule_follow_train_config():
    t = _train(global_batch=32, micro_batch=4, num_workers=2, zero_stage=2,
               optimizer={"grad_clip": 0.7})
    ds = deepspeed_config(t)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 == t.grad_accum
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.7
    assert ds["bf16"]["enabled"] is False and deepspeed_config(t, use_gpu=True)["bf16"]["enabled"] is True
    assert deepspeed_config(t, world_size=1)["gradient_accumulation_steps"] == 8
    f = WarmupCosine(warmup=3, total=20)
    lrs = [f(s) for s in range(20)]
    assert lrs[:3] == [0.25, 0.5, 0.75] and lrs[3] == 1.0
    assert all(x > y for x, y in zip(lrs[3:], lrs[4:])) and 0 < lrs[-1] < 0.01 and f(20) == 0.0


# ----------------------------------------------------------------------------- the loop


def _steps_by_minibatch(metrics_path):
    steps = read_steps(metrics_path)
    out: dict[int, list[dict]] = {}
    for r in steps:
        out.setdefault(r["minibatch"], []).append(r)
    return steps, out


def test_dpo_loss_falls_and_grad_scale_is_half_after_every_boundary(run_policy):
    steps, by_mb = _steps_by_minibatch(run_policy.metrics_path)
    assert [r["step"] for r in steps] == list(range(1, 19)) and sorted(by_mb) == [1, 2, 3]
    for k, rs in by_mb.items():
        first = rs[0]
        # the reference was just swapped to the policy: h = 0, so the loss is log 2 and sigma(r_l - r_w) = 0.5
        assert first["grad_scale"] == pytest.approx(0.5, abs=1e-5), k
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert first["reward_chosen"] == pytest.approx(0, abs=1e-4)
    # the loss really falls on a learnable preference
    last_epoch = [r for r in by_mb[1] if r["epoch"] == 2]
    assert sum(r["loss"] for r in last_epoch) / len(last_epoch) < math.log(2) - 0.02
    assert sum(r["margin"] for r in steps) / len(steps) > 0
    for r in steps:
        for key in ("reward_chosen", "reward_rejected", "margin", "accuracy", "grad_norm", "lr", "pairs_per_s",
                    "tokens_per_s", "epoch", "minibatch"):
            assert r[key] is not None, key
    lrs = [r["lr"] for r in steps]
    assert max(lrs) == pytest.approx(2e-3) and lrs[-1] < lrs[5]  # one schedule over all K x E epochs


def test_dual_clip_loss_falls_and_logs_clip_fractions(tmp_path, pairs_file, tiny_model_dir):
    # margins scaled down so the clips can fire on a tiny model (TSO-METHOD.md section 5)
    t = _train(minibatches=1, epochs=4, loss={"type": "dual_clip", "beta": 1.0, "margin_pos": 0.5, "margin_neg": 0.5},
               optimizer={"lr": 3e-3})
    res = train_policy_local(_job(t, pairs_file, tiny_model_dir, tmp_path / "dc"), log=None, checkpoints=False)
    steps = read_steps(res.metrics_path)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert sum(r["loss"] for r in steps[-6:]) / 6 < math.log(2) - 0.05
    assert all(r["clip_frac_chosen"] is not None and r["clip_frac_rejected"] is not None for r in steps)
    assert max(r["clip_frac_rejected"] + r["clip_frac_chosen"] for r in steps) > 0  # the clips do fire


def test_stored_reference_matches_fresh_process_recompute_from_boundary_checkpoint(run_policy, pairs_file,
                                                                                   tiny_model_dir):
    ckpts = sorted(run_policy.checkpoints)
    assert [Path(c).name for c in ckpts] == [f"stage1_boundary_0{k}" for k in (1, 2, 3)]
    out = _verify_in_fresh_process(ckpts[:2], pairs_file, tiny_model_dir)
    for k, r in enumerate(out, start=1):
        assert r["boundary"] == k and r["minibatch"] == k + 1 and r["pairs"] == 24
        assert r["max_abs_diff"] < 1e-4, r
        assert r["mean_abs_diff_base"] > 100 * 1e-4, r  # the base's log-probs would fail this check


def _verify_in_fresh_process(ckpts, pairs_file, base) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.tools.verify_reference", *map(str, ckpts), "--pairs", str(pairs_file),
                           "--base", str(base)], capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_frozen_copy_reference_gives_the_same_training(tmp_path, run_policy, pairs_file, tiny_model_dir):
    res = train_policy_local(_job(_train(reference="frozen_copy"), pairs_file, tiny_model_dir, tmp_path / "fc"),
                             log=None, checkpoints=False)
    a, b = read_steps(run_policy.metrics_path), read_steps(res.metrics_path)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    assert max_weight_diff(model_weights(Path(run_policy.policy_dir)), model_weights(Path(res.policy_dir))) < 1e-5


def test_resume_after_failure_matches_uninterrupted_run_without_redoing_minibatches(tmp_path, run_policy, pairs_file,
                                                                                   tiny_model_dir):
    """Stop the run in mini-batch 3, resume from the boundary-2 checkpoint, end with the same weights."""
    out = tmp_path / "resumed"
    job = _job(_train(), pairs_file, tiny_model_dir, out)
    with crash_at_step(15), pytest.raises(Crash):  # mini-batch 3 has steps 13..18
        train_policy_local(job, log=None)
    assert not (out / "policy").exists()
    res = train_policy_local(job, log=None)  # picks up checkpoints/stage1_boundary_02
    assert res.summary["resumed_from"] == 2
    records = [r for r in read_records(res.metrics_path) if r.get("kind") == "step"]
    resumed = [r for r in records if r["resumed_from"] == 2]
    assert {r["minibatch"] for r in resumed} == {3} and [r["step"] for r in resumed] == list(range(13, 19))
    assert sorted(r["step"] for r in records if r["minibatch"] < 3) == list(range(1, 13))  # done once
    assert [r["kind"] for r in read_kind(res.metrics_path, "reference")] == ["reference"] * 3  # no extra ref pass
    assert max_weight_diff(model_weights(Path(run_policy.policy_dir)), model_weights(Path(res.policy_dir))) < 1e-6
    lineage = json.loads((Path(res.policy_dir) / "lineage.json").read_text())
    assert lineage["stage"] == 1 and lineage["base"] == str(tiny_model_dir) and lineage["data"] == str(pairs_file)


def test_keep_checkpoints_one_keeps_only_the_last_boundary_and_resumes_from_it(tmp_path, run_policy, pairs_file,
                                                                              tiny_model_dir, monkeypatch):
    """keep_checkpoints = 1: one boundary checkpoint on disk at any time, enough to resume to the same
    weights. Checkpoints are written under the output directory, never the system temp dir, and a
    worker clears what a killed attempt of its rank left there."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))  # where tempfile.mkdtemp() would write
    out = tmp_path / "keep1"
    job = _job(_train(keep_checkpoints=1), pairs_file, tiny_model_dir, out)
    with crash_at_step(15), pytest.raises(Crash):
        train_policy_local(job, log=None)
    ckpts = out / "checkpoints"
    assert _names(ckpts) == ["stage1_boundary_02"] and _names(out / ".tmp") == []
    # what kill -9 during a boundary save leaves: this rank's scratch copy, another rank's, a half copy
    for name in ("tso-boundary3-rank0-killed", "tso-boundary3-rank1-other"):
        (out / ".tmp" / name / "engine").mkdir(parents=True)
    (ckpts / ".stage1_boundary_03.tmp-99999" / "policy").mkdir(parents=True)

    res = train_policy_local(job, log=None)
    assert res.summary["resumed_from"] == 2
    assert _names(ckpts) == ["stage1_boundary_03"] and res.checkpoints == [str(ckpts / "stage1_boundary_03")]
    assert max_weight_diff(model_weights(Path(run_policy.policy_dir)), model_weights(Path(res.policy_dir))) < 1e-6
    assert _names(out / ".tmp") == ["tso-boundary3-rank1-other"]  # rank 0's leftover removed, rank 1's its own
    assert [p.name for p in system_tmp.iterdir() if p.name.startswith("tso-")] == []


def test_rng_state_round_trips_exactly_and_loads_with_weights_only(tmp_path):
    import random

    import numpy as np

    from tso.train.checkpoint import load_rng, rng_state, save_rng, set_rng_state

    def draws():
        return (torch.rand(4).tolist(), np.random.standard_normal(3).tolist(), np.random.randint(0, 10**6, 3).tolist(),
                random.gauss(0, 1), random.random(), random.getrandbits(64))

    outer = rng_state()
    try:
        torch.manual_seed(3), np.random.seed(4), random.seed(5)
        np.random.standard_normal(), random.gauss(0, 1)  # both now hold a cached Gaussian in their state
        path = save_rng(tmp_path / "rng" / "rank0.pt")
        expected = draws()
        assert draws() != expected
        load_rng(path)
        assert draws() == expected
        state = torch.load(path, weights_only=True)
        assert isinstance(state["numpy"]["keys"], torch.Tensor) and state["numpy"]["has_gauss"] == 1
        assert isinstance(state["python"]["state"], torch.Tensor) and state["python"]["gauss_next"] is not None
        old = tmp_path / "old.pt"  # what an older tso wrote: numpy's tuple with an ndarray, pickled
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}, old)
        with pytest.raises(ValueError, match="does not load with weights_only=True"):
            load_rng(old)
    finally:
        set_rng_state(outer)


def test_resume_refuses_a_checkpoint_from_different_pairs(tmp_path, run_policy, pairs_file, tiny_model_dir):
    import shutil

    out = tmp_path / "other"
    shutil.copytree(Path(run_policy.out_dir) / "checkpoints", out / "checkpoints")
    other = write_pairs(arithmetic_pairs(72, seed=99), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="checkpoint is from a different run.*pairs_digest"):
        train_policy_local(_job(_train(), other, tiny_model_dir, out), log=None)


def test_outputs_policy_dir_lineage_metrics_and_plot(run_policy, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    policy = Path(run_policy.policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy)
    assert model is not None and (policy / "tokenizer.json").is_file()
    assert max_weight_diff(model_weights(policy), model_weights(Path(tiny_model_dir))) > 1e-3  # it did train
    lineage = json.loads((policy / "lineage.json").read_text())
    assert lineage["kind"] == "policy" and lineage["config_hash"] == "test" and lineage["minibatches"] == 3
    boundaries = read_kind(run_policy.metrics_path, "boundary")
    assert [b["boundary"] for b in boundaries] == [1, 2, 3] and [b["step"] for b in boundaries] == [6, 12, 18]
    assert all(b["first_grad_scale"] == pytest.approx(0.5, abs=1e-5) for b in boundaries)
    png = Path(run_policy.plot_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert json.loads((Path(run_policy.out_dir) / "summary.json").read_text())["steps"] == 18


def test_metrics_reader_keeps_last_record_per_step_and_skips_a_cut_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"kind": "step", "step": 1, "loss": 1.0}\n{"kind": "step", "step": 2, "loss": 2.0}\n'
                 '{"kind": "step", "step": 2, "loss": 3.0}\n{"kind": "step", "st')
    assert [(r["step"], r["loss"]) for r in read_steps(p)] == [(1, 1.0), (2, 3.0)]


def test_tso_plot_command(tmp_path, run_policy):
    out = tmp_path / "p.png"
    proc = subprocess.run([sys.executable, "-m", "tso.cli", "plot", run_policy.metrics_path, "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "tso.cli", "plot", str(tmp_path / "missing.jsonl")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr


def test_pairs_file_without_required_columns_names_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "x", "chosen": "y"}]), p)
    with pytest.raises(ValueError, match=r"bad.parquet: pairs file lacks column\(s\) \['rejected'\]"):
        read_pairs(p)


def test_pairs_file_prompt_messages_column_is_the_chat_trained_on(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}]
    rows = [{"id": "a", "prompt": "be brief 2+2=", "chosen": "4", "rejected": "5", "prompt_messages": json.dumps(chat)},
            {"id": "b", "prompt": "3+3=", "chosen": "6", "rejected": "7", "prompt_messages": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    pairs, rep = tokenize_pairs(read_pairs(tmp_path / "p.parquet"), tiny_tokenizer, 64)
    assert rep.kept == 2
    assert tiny_tokenizer.decode(pairs[0].prompt) == "<|system|>be brief<|user|>2+2=<|assistant|>"
    assert tiny_tokenizer.decode(pairs[1].prompt) == "<|user|>3+3=<|assistant|>"


# ----------------------------------------------------------------------------- judge SFT


def test_judge_sft_loss_is_answer_tokens_only_and_falls(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from tso.method.logprobs import slow_sequence_logprob
    from tso.train.backend import TorchBackend
    from tso.train.data import encode_response
    from tso.train.feedback import read_feedback
    from tso.train.judge_sft import JudgeJob, train_judge_local
    from tso.train.sft import sft_step

    rows = toy_feedback(48, seed=3)
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"messages": [{"role": "user", "content": "q"}]})]
    fb = tmp_path / "fb.jsonl"
    fb.write_text("\n".join(lines) + "\n")
    examples, rep = read_feedback(fb, tiny_tokenizer, max_length=320)
    assert rep.kept == 48 and [n for n, _ in rep.malformed] == [49, 50]

    # the loss of one micro-batch is the mean NLL of the answer tokens, the prompt only conditions
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    t = _train(global_batch=4, micro_batch=4, optimizer={"lr": 1e-9})
    backend = TorchBackend(model, t, total_steps=1)
    batch = examples[:4]
    expected = -sum(slow_sequence_logprob(model, e.prompt, e.answer) for e in batch) / sum(len(e.answer) for e in batch)
    out = sft_step(backend, [batch], tiny_tokenizer.pad_token_id)
    assert out["loss"] == pytest.approx(expected, rel=1e-4)
    assert batch[0].answer == encode_response(tiny_tokenizer, rows_by_id(rows)[batch[0].id]["messages"][-1]["content"])

    write_jsonl(rows, tmp_path / "clean.jsonl")
    t = _train(global_batch=8, micro_batch=8, epochs=3, max_length=320, optimizer={"lr": 3e-3, "warmup_ratio": 0.0})
    job = JudgeJob(train=t.model_dump(mode="json"), feedback_path=str(tmp_path / "clean.jsonl"),
                   base_path=str(tiny_model_dir), out_dir=str(tmp_path / "judge"), work_dir=str(tmp_path / "judge_train"),
                   backend="torch")
    summary = train_judge_local(job, log=None)
    assert summary["steps"] == 18 and summary["last_loss"] < 0.6 * summary["first_loss"]
    lineage = json.loads((tmp_path / "judge" / "lineage.json").read_text())
    assert lineage["kind"] == "judge" and lineage["data"] == str(tmp_path / "clean.jsonl")


def rows_by_id(rows):
    return {r["id"]: r for r in rows}


def test_judge_checkpoints_go_to_its_work_dir_and_are_removed_after_reporting(tmp_path, tiny_model_dir, monkeypatch):
    from tso.train.judge_sft import JudgeJob, run_judge_worker

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    fb = write_jsonl(toy_feedback(16, seed=2), tmp_path / "fb.jsonl")
    t = _train(global_batch=8, micro_batch=8, epochs=2, max_length=320, optimizer={"lr": 1e-3, "warmup_ratio": 0.0})
    work = tmp_path / "judge_train"
    job = JudgeJob(train=t.model_dump(mode="json"), feedback_path=str(fb), base_path=str(tiny_model_dir),
                   out_dir=str(tmp_path / "judge"), work_dir=str(work), backend="torch")
    seen = []

    def report(metrics, ckpt):
        if ckpt is not None:
            seen.append((metrics["boundary"], Path(ckpt).parent, _names(Path(ckpt))))

    summary = run_judge_worker(job, report=report, log=None)
    files = ["engine", "policy", "rng", "tso_state.json"]
    assert summary["steps"] == 4 and seen == [(1, work / ".tmp", files), (2, work / ".tmp", files)]
    assert _names(work / ".tmp") == [] and [p for p in system_tmp.iterdir() if p.name.startswith("tso-")] == []


# ----------------------------------------------------------------------------- DeepSpeed in one process


def test_deepspeed_engine_in_one_process_matches_plain_torch(tmp_path, pairs_file, tiny_model_dir, run_policy):
    """The same core under deepspeed.initialize (ZeRO-2, fp32, torch AdamW) gives the same training.
    Runs in a subprocess: DeepSpeed sets up a process group that should not leak into other tests."""
    code = (
        "import json, sys; from tso.config import TrainConfig; from tso.train.stage import PolicyJob, train_policy_local;"
        "t = TrainConfig.model_validate(json.loads(sys.argv[1]));"
        "r = train_policy_local(PolicyJob(train=t.model_dump(mode='json'), pairs_path=sys.argv[2], base_path=sys.argv[3],"
        " out_dir=sys.argv[4], stage=1, config_hash='test', backend='deepspeed'), log=None, checkpoints=False);"
        "print(json.dumps({'policy': r.policy_dir}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(_train().model_dump(mode="json")), str(pairs_file),
                           str(tiny_model_dir), str(tmp_path / "ds")], capture_output=True, text=True, timeout=280,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds_steps = read_steps(tmp_path / "ds" / "metrics.jsonl")
    assert [r["loss"] for r in ds_steps] == pytest.approx([r["loss"] for r in read_steps(run_policy.metrics_path)],
                                                          abs=1e-5)
    assert max_weight_diff(model_weights(tmp_path / "ds" / "policy"), model_weights(Path(run_policy.policy_dir))) < 1e-5


# ----------------------------------------------------------------------------- CLI


def _config_yaml(tmp_path, tiny_model_dir, **train) -> Path:
    import yaml

    models = [{"name": "base", "path": str(tiny_model_dir), "version": 0, "size": 1},
              {"name": "small", "path": str(tiny_model_dir), "version": 0, "size": 0.5},
              {"name": "big", "path": str(tiny_model_dir), "version": 1, "size": 2}]
    t = {"minibatches": 2, "epochs": 1, "global_batch": 8, "micro_batch": 4, "max_length": 64,
         "optimizer": {"lr": 1e-3}, **train}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "matrix": {"base": "base", "models": models},
                                 "train": t}))
    return p


def test_tso_train_command_local_writes_version_dir_metrics_and_plot(tmp_path, tiny_model_dir, pairs_file):
    cfg = _config_yaml(tmp_path, tiny_model_dir)
    proc = subprocess.run([sys.executable, "-m", "tso.cli", "train", str(cfg), "--pairs", str(pairs_file), "--local",
                           "--backend", "torch", "--stage", "2"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run" / "stage-2" / "train"  # the layout of tso run
    assert f"policy:  {out / 'policy'}" in proc.stdout
    assert "[stage 2] step 1/" in proc.stdout and "loss 0.6931" in proc.stdout  # per-step progress
    lineage = json.loads((out / "policy" / "lineage.json").read_text())
    assert lineage["stage"] == 2 and lineage["base_name"] == "base" and lineage["data"] == str(pairs_file)
    from tso.config import load_config

    assert lineage["config_hash"] == load_config(cfg).config_hash()
    assert (out / "training.png").is_file() and len(read_steps(out / "metrics.jsonl")) == 2 * 4

    # bad input (here through --set, as for tso run): a clear error and exit status 2, no stack trace
    bad = subprocess.run([sys.executable, "-m", "tso.cli", "train", str(cfg), "--pairs", str(pairs_file), "--local",
                          "--engine", "torch", "--out", str(tmp_path / "x"), "--set", "train.global_batch=64",
                          "--set", "train.micro_batch=8"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert bad.returncode == 2 and "fewer than one optimizer step" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "run" / "train" / "stage3").mkdir(parents=True)  # a directory of the layout tso train used before
    old = subprocess.run([sys.executable, "-m", "tso.cli", "train", str(cfg), "--pairs", str(pairs_file), "--local",
                          "--stage", "3"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert old.returncode == 2 and "older tso layout" in old.stderr and "stage-3/train" in old.stderr
    missing = subprocess.run([sys.executable, "-m", "tso.cli", "train", str(cfg), "--pairs", str(tmp_path / "no.parquet"),
                              "--local"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert missing.returncode == 2 and "no.parquet: no such pairs file" in missing.stderr
