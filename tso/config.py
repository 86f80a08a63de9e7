"""One typed configuration for a whole TSO run, loaded from YAML.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error and not a
silently ignored setting. Defaults are the paper's hyper-parameters (docs/method.md, Hyper-parameters).
Errors raised while loading name the file, the field path and the problem.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tso.method.loss_names import LOSS_NAMES, LOSS_SETTINGS, LossType


def tso_home() -> Path:
    """Where tso keeps what it builds and caches (the tiny matrix, tokenizers)."""
    return Path(os.environ.get("TSO_HOME", "~/.cache/tso")).expanduser()


class ConfigError(ValueError):
    """A configuration problem, phrased as ``<file>: <field path>: <problem>``."""

    def __init__(self, source: str, field: str, problem: str):
        self.source, self.field, self.problem = source, field, problem
        super().__init__(f"{source}: {field or '<top level>'}: {problem}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- serving / engines


class EngineConfig(_Section):
    """How a model generates: the engine and its numeric/batching options."""

    kind: Literal["transformers", "vllm", "auto"] = Field(
        "auto", description="auto: vLLM when installed and a GPU is present, else transformers."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(1, ge=1, le=256, description="torch threads per replica (replicas share the cores).")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Serve batching: requests generated together.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10, description="Serve batching: wait for a fuller batch.")
    generate_on: Literal["thread", "event_loop"] = Field(
        "thread", description="transformers engine: where a batch is generated. thread: health checks, info and "
        "swaps answer during a long generation; event_loop: they wait for it (tiny models batch better).",
    )
    max_model_len: int | None = Field(None, ge=16, description="Context limit; default: the model config's.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM on GPU: the share of GPU memory it takes.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="vLLM: GPUs one model is split over.")
    enforce_eager: bool | None = Field(None, description="vLLM: no CUDA graphs/compilation; default: on CPU only.")
    enable_prefix_caching: bool | None = Field(None, description="vLLM: reuse the KV cache of shared prompt prefixes.")
    kv_cache_gib: int = Field(1, ge=1, le=1024, description="vLLM on CPU: KV cache GiB per engine (VLLM_CPU_KVCACHE_SPACE).")
    cpu_threads_bind: str = Field(
        "nobind", pattern=r"^(auto|nobind|[0-9,\-|]+)$",
        description="vLLM on CPU: VLLM_CPU_OMP_THREADS_BIND (auto, nobind, or cores such as 0-1).",
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vLLM: more AsyncEngineArgs, passed as they are.")


class ResourceConfig(_Section):
    """Ray Serve placement of one deployment."""

    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    autoscaling: dict[str, Any] | None = Field(None, description="Serve autoscaling_config (replaces num_replicas).")
    accelerator_type: str | None = Field(None, max_length=64, description="Ray accelerator type, e.g. H100 or A100.")
    placement_group_bundles: list[dict[str, float]] | None = Field(
        None, min_length=1, description="Serve placement bundles, e.g. one {GPU: 1} per tensor-parallel rank."
    )
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


StopToken = str | int


class CheckpointOptions(_Section):
    """How a checkpoint is loaded and talked to: the keys a real model may need beside its path."""

    revision: str | None = Field(None, max_length=256, description="Hub revision (branch, tag or commit) of a hub id.")
    trust_remote_code: bool = Field(False, description="Run the checkpoint's own modelling code (hub models only).")
    chat_template: str | None = Field(
        None, description="Jinja chat template, or a file holding one; overrides or supplies the tokenizer's."
    )
    stop_tokens: list[StopToken] | None = Field(
        None, min_length=1, max_length=64,
        description="Tokens (text or id) that end an answer; default: the EOS ids plus the template's end-of-turn token.",
    )


class ModelEntry(CheckpointOptions):
    """One model of the matrix: a Hugging Face checkpoint (a local directory or a hub id)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64, description="Unique; 'human' is reserved.")
    path: str = Field(description="Local model directory (${TSO_HOME}, ${VAR} and ~ expand) or a hub id (org/name).")
    version: int = Field(ge=0, description="Older to newer; versions are compared within a size.")
    size: float = Field(gt=0, description="Any number that orders sizes, e.g. parameters in billions.")
    role: Literal["auto", "positive", "negative", "none"] = Field(
        "auto", description="auto: the paper's rule (newest largest positive; smaller or older than base negative)."
    )
    weight: float | None = Field(None, ge=0, le=1, description="Mixing weight within its mixture.")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    resources: ResourceConfig = Field(default_factory=ResourceConfig)


class MatrixConfig(_Section):
    base: str = Field(description="Name of the base model: the policy starts from it.")
    models: list[ModelEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> MatrixConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names {dupes}")
        if self.base not in names:
            raise ValueError(f"base {self.base!r} is not a model of the matrix (have {names})")
        if "human" in names:
            raise ValueError("'human' is reserved for the human responses source")
        return self

    def entry(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


class SamplingConfig(_Section):
    temperature: float = Field(0.7, ge=0, le=5)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1, le=32768)


# ----------------------------------------------------------------------------- judge


DEFAULT_RUBRICS = {
    "correctness": "Rate how correct and complete the answer is.",
    "conciseness": "Rate how concise the answer is and whether it follows the requested format.",
}


class JudgeTrainConfig(_Section):
    lr: float = Field(1e-5, gt=0)
    epochs: int = Field(1, ge=1)
    global_batch: int = Field(32, ge=1)
    micro_batch: int = Field(8, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_examples: int | None = Field(None, ge=1)
    max_length: int = Field(1024, ge=8, description="Longer feedback examples are reported and left out.")


class JudgeConfig(CheckpointOptions):
    path: str | None = Field(None, description="A trained judge; default <run_dir>/judge after stage 0.")
    feedback: str | None = Field(None, description="Feedback JSONL for evaluation correction (stage 0).")
    held_out: str | None = Field(
        None, description="Held-out scored feedback JSONL (judge.feedback's format, other prompts): after stage 0 "
        "the judge, the uncorrected base and a length-only predictor are measured on it (judge_quality.json).")
    held_out_max: int = Field(200, ge=3, description="Judge at most this many held-out records (a fixed random sample).")
    dimensions: list[str] = Field(
        default_factory=lambda: ["correctness", "conciseness"], min_length=1, description="Rubric dimensions scored."
    )
    rubrics: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_RUBRICS), description="Rubric text per dimension.")
    answer_format: Literal["evidence_first", "score_only"] = Field(
        "evidence_first", description="What the rubric prompt asks for: evidence then 'Score: X', or the score only."
    )
    # Evidence needs room: a real judge writes a few sentences before its score.
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=256))
    train: JudgeTrainConfig = Field(default_factory=JudgeTrainConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    resources: ResourceConfig = Field(default_factory=ResourceConfig)

    @model_validator(mode="after")
    def _rubric_per_dimension(self) -> JudgeConfig:
        missing = [d for d in self.dimensions if d not in self.rubrics]
        if missing:
            raise ValueError(f"dimensions {missing} have no rubric text in judge.rubrics")
        return self


# ----------------------------------------------------------------------------- pairs


class JudgeFilterConfig(_Section):
    enabled: bool = Field(False, description="Keep a pair only if S(chosen) > S(rejected) + delta.")
    delta: float = Field(0.0, ge=0)


class RsoConfig(_Section):
    """RSO's knobs (pairs.mode: rso), with the RSO paper's defaults: 64 samples drawn, 8 accepted, beta 0.5."""

    samples: int = Field(64, ge=2, le=64, description="Policy samples per prompt, each scored by the judge (the reward).")
    accepted: int = Field(8, ge=2, le=64, description="Samples the rejection sampler keeps per prompt, then paired two by two.")
    beta: float = Field(0.5, gt=0, description="Temperature of the target pi*(y|x) ~ pi(y|x) exp(r / beta), in score units.")
    normaliser: Literal["max"] | float = Field(
        "max", description="M in the acceptance test u < exp((r - M) / beta): 'max' is the best remaining reward each "
        "round (RSO's algorithm), a number a fixed bound such as 10, the score scale's top.")

    @model_validator(mode="after")
    def _accepted_within_samples(self) -> RsoConfig:
        if self.accepted > self.samples:
            raise ValueError(f"accepted ({self.accepted}) cannot exceed samples ({self.samples})")
        return self


class PairsConfig(_Section):
    mode: Literal["tso", "self_reward", "rso"] = Field(
        "tso", description="self_reward: only the policy's own judged samples, best vs worst (paper Table 5 baseline); "
        "rso: the policy's own samples, judged, kept by statistical rejection sampling and paired (pairs.rso).")
    rso: RsoConfig = Field(default_factory=RsoConfig)
    prompts: str | None = Field(None, description="Prompts JSONL/Parquet (prompt, human response, id).")
    human_weight: float = Field(0.5, ge=0, le=1, description="alpha of the human responses source.")
    positive_sources: list[str] | None = Field(None, description="Explicit positive models (overrides roles).")
    negative_sources: list[str] | None = Field(None, description="Explicit negative models (overrides roles).")
    n_pos: int = Field(1, ge=1, le=64, description="Positive draws per prompt.")
    n_neg: int = Field(1, ge=1, le=64, description="Negative draws per prompt.")
    n_self: int = Field(4, ge=0, le=64, description="Policy samples per prompt, scored by the judge.")
    tau_pos: float = Field(8.0, ge=2, le=10, description="A judged policy answer scoring >= this is a positive.")
    tau_neg: float = Field(4.0, ge=2, le=10, description="A judged policy answer scoring <= this is a negative.")
    self_pair_fraction: float = Field(0.5, ge=0, le=1, description="Share of prompts that try a self pair.")
    judge_filter: JudgeFilterConfig = Field(default_factory=JudgeFilterConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    truncated: Literal["drop", "keep"] = Field(
        "drop", description="An answer cut by max_new_tokens or the context: left out (drop) or trained without EOS (keep)."
    )
    max_redraws: int = Field(
        2, ge=0, le=16, description="Further keyed draws from a side's mixture when its answer is dropped or fails."
    )
    max_prompt_chars: int = Field(8192, ge=1, description="Longer prompts are rejects (never truncated).")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N valid prompts.")

    @model_validator(mode="after")
    def _thresholds(self) -> PairsConfig:
        if self.tau_neg >= self.tau_pos:
            raise ValueError(f"tau_neg ({self.tau_neg}) must be below tau_pos ({self.tau_pos})")
        return self


# ----------------------------------------------------------------------------- training


class LossConfig(_Section):
    type: LossType = Field("dual_clip", description=" | ".join(LOSS_NAMES))
    beta: float = Field(0.1, gt=0, description="Reward scale r = beta * log-ratio.")
    margin_pos: float = Field(20.0, ge=0, description="m_w: chosen reward clip (reward units).")
    margin_neg: float = Field(10.0, ge=0, description="m_l: rejected reward clip (reward units).")
    ipo_tau: float = Field(0.2, gt=0, description="IPO's tau (tau = beta reproduces OpenRLHF/TRL).")
    ipo_normalize: Literal["sum", "mean"] = Field("sum", description="IPO log-ratios summed or averaged per token.")
    cdpo_eps: float = Field(0.3, ge=0, lt=0.5, description="cDPO label smoothing.")

    def used_settings(self) -> dict[str, Any]:
        """Only the constants the chosen loss reads, so reports and logs leave out the inert ones."""
        return {name: getattr(self, name) for name in LOSS_SETTINGS[self.type]}


class OptimizerConfig(_Section):
    lr: float = Field(5e-7, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.05, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["cosine", "constant"] = "cosine"

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("betas must lie in [0, 1)")
        return v


class LoraSettings(_Section):
    """train.lora: train low-rank adapters (peft) instead of every weight; the base weights stay frozen."""

    r: int = Field(16, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scale: the adapter's update is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get adapters (module names, or all-linear).",
    )
    export: Literal["merged", "adapter"] = Field(
        "merged", description="merged: an ordinary HF directory (serving needs no peft); adapter: peft adapter only.",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if isinstance(v, list) and (not v or not all(isinstance(m, str) and m for m in v)):
            raise ValueError("name at least one module (e.g. q_proj), or all-linear")
        return v


# DeepSpeed keys tso derives from typed settings: train.deepspeed may repeat them, not contradict them.
DEEPSPEED_TYPED_KEYS = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch / (train.micro_batch x train.num_workers)",
    "gradient_clipping": "train.optimizer.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.use_gpu",  # bf16 with fp32 master weights on GPU, fp32 on CPU
    "fp16.enabled": "train.use_gpu",  # never fp16
}
# sections DeepSpeed would build instead of tso's (torch AdamW, the warm-up/cosine schedule)
DEEPSPEED_REFUSED_KEYS = {"optimizer": "train.optimizer", "scheduler": "train.optimizer (warmup_ratio, schedule)"}


def deepspeed_conflicts(override: dict[str, Any], derived: dict[str, Any]) -> list[str]:
    """What in ``train.deepspeed`` contradicts the config tso derives (``derived``, the generated DeepSpeed
    config): each problem names the DeepSpeed key and the tso setting that owns it. Equal values are fine."""
    problems = [f"train.deepspeed.{k}: tso builds it from {owner}; set that instead"
                for k, owner in DEEPSPEED_REFUSED_KEYS.items() if k in override]
    for dotted, owner in DEEPSPEED_TYPED_KEYS.items():
        head, _, tail = dotted.partition(".")
        if head not in override:
            continue
        mine, theirs = override[head], derived.get(head)
        if tail:
            if not isinstance(mine, dict):
                problems.append(f"train.deepspeed.{head}: expected a mapping, got {type(mine).__name__}")
                continue
            if tail not in mine:
                continue
            mine, theirs = mine[tail], (theirs or {}).get(tail)
        if mine != theirs and not (isinstance(mine, (int, float)) and not isinstance(mine, bool)
                                   and isinstance(theirs, (int, float)) and float(mine) == float(theirs)):
            why = " (tso trains in bf16 with fp32 master weights on GPU, fp32 on CPU)" if owner == "train.use_gpu" else ""
            problems.append(f"train.deepspeed.{dotted} = {mine!r} contradicts {owner}{why}: tso sets {theirs!r}; "
                            f"change {owner} instead")
    return problems


class TrainConfig(_Section):
    loss: LossConfig = Field(default_factory=LossConfig)
    minibatches: int = Field(3, ge=1, description="K: mini-batches, the reference is swapped at each boundary.")
    epochs: int = Field(2, ge=1, description="E: epochs on each mini-batch.")
    reference: Literal["policy", "frozen_copy"] = Field(
        "policy", description="policy: reference log-probs computed by the policy at each boundary (no copy)."
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    global_batch: int = Field(256, ge=1, description="Pairs per optimizer step, over all workers.")
    micro_batch: int = Field(8, ge=1, description="Pairs per forward/backward on one worker.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU).")
    use_gpu: bool = False
    compile: bool = Field(False, description="DeepSpeed engine.compile().")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (KV cache off); the reference pass runs without it.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel (flash_attention_2 needs the flash-attn package and a GPU).",
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="Merged over the generated DeepSpeed config (offload, bucket sizes, ...); "
        "keys tso derives (ZeRO stage, batch sizes, precision, clipping) may not contradict their settings.",
    )
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters (peft) instead of all weights.")
    max_length: int = Field(2048, ge=8, description="Longer prompt+response pairs are reported and skipped.")
    seed: int = 43
    log_every: int | None = Field(
        None, ge=1, description="Steps between printed step lines (metrics.jsonl holds every step); default: about "
        "20 lines per stage, plus the last step of each epoch.")
    keep_checkpoints: int = Field(
        1, ge=1, description="Boundary checkpoints kept per stage (the newest; resume needs only the last)."
    )
    storage_path: str | None = Field(
        None, description="Ray Train's checkpoint storage: an absolute path every node mounts, or a URI "
        "(s3://bucket/prefix, gs://..., file:///...); each training directory gets its own subdirectory. "
        "Default: <training dir>/ray.",
    )
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Extra Ray resources each Train worker asks for, e.g. {trainer_node: 1} to pin training "
        "to the nodes started with that resource; CPU: 1 (GPU: 1 with use_gpu) unless given.",
    )
    reference_batch: int | None = Field(
        None, ge=1, description="Pairs per forward of the boundary reference pass (no gradients; length-sorted, "
        "packed). Default: 4 x micro_batch.",
    )

    @field_validator("storage_path")
    @classmethod
    def _shared_storage(cls, v: str | None) -> str | None:
        # every node resolves it alike: a relative path or ~ would name a different place on each
        if v is not None and "://" not in v and not os.path.isabs(v):
            raise ValueError(f"{v!r} is neither an absolute path nor a URI such as s3://bucket/prefix")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        bad = {k: n for k, n in (v or {}).items() if n < 0 or not k}
        if bad:
            raise ValueError(f"resource amounts must be >= 0 with a name, got {bad}")
        return v

    @model_validator(mode="after")
    def _batches(self) -> TrainConfig:
        per_step = self.micro_batch * self.num_workers
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch ({self.global_batch}) must be a multiple of micro_batch x num_workers ({per_step})"
            )
        return self

    @model_validator(mode="after")
    def _deepspeed_override(self) -> TrainConfig:
        if self.attn_implementation == "flash_attention_2" and not self.use_gpu:
            raise ValueError("train.attn_implementation = flash_attention_2 needs train.use_gpu (a CUDA kernel); "
                             "use sdpa on CPU")
        if not self.deepspeed:
            return self
        derived = {
            "train_batch_size": self.global_batch, "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum, "gradient_clipping": self.optimizer.grad_clip,
            "zero_optimization": {"stage": self.zero_stage}, "bf16": {"enabled": self.use_gpu},
            "fp16": {"enabled": False},
        }
        problems = deepspeed_conflicts(self.deepspeed, derived)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.num_workers)


# ----------------------------------------------------------------------------- evaluation / serving


VERIFIER_PATTERN = r"^(none|toyworld|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$"


class EvalConfig(_Section):
    prompts: str | None = Field(None, description="Held-out prompts JSONL for evaluation.")
    verifier: str = Field(
        "none", pattern=VERIFIER_PATTERN,
        description="Ground truth: none, toyworld, or module:function(prompt, response, metadata) -> 2..10 or None.",
    )
    max_prompts: int | None = Field(None, ge=1)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_new_tokens=2048))


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServeConfig(_Section):
    """The REST API and the deployments' limits: safe by default (loopback, bounded work, no CORS)."""

    host: str = Field("127.0.0.1", description="Bind address; any non-loopback host requires a token.")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    app_name: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Serve app name; default: tso-<name>-run (tso run), tso-<name>-serve (tso serve), "
        "<run app>-<baseline> for each baseline.",
    )
    auth_token_env: str = Field("TSO_API_TOKEN", description="Environment variable holding the bearer token.")
    auth_token_file: str | None = Field(None, description="File holding the bearer token (a mounted secret).")
    protect_docs: bool = Field(True, description="With a token, /docs and /openapi.json need it too.")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Host headers accepted beside localhost, 127.0.0.1, ::1 and serve.host."
    )
    cors_origins: list[str] = Field(default_factory=list, description="Browser origins allowed (CORS off when empty).")
    log_requests: bool = Field(False, description="Log prompts and answers at INFO (off: only sizes and timings).")
    max_body_bytes: int = Field(1_000_000, ge=1)
    max_field_chars: int = Field(32_000, ge=1)
    max_batch_items: int = Field(64, ge=1)
    max_new_tokens: int = Field(4096, ge=1, le=32768, description="Most new tokens one sample may ask for.")
    max_n: int = Field(16, ge=1, le=64, description="Most samples one request may ask for.")
    max_request_tokens: int = Field(
        16_384, ge=1, description="Token budget of one request: n x max_new_tokens (score batches: items x dimensions "
        "x the judge's max_new_tokens)."
    )
    request_timeout_s: float = Field(300.0, gt=0, description="An ingress request running longer answers 504.")
    body_timeout_s: float = Field(30.0, gt=0, description="A request body arriving slower answers 408.")
    max_queued_requests: int = Field(
        256, ge=1, description="Requests queued per deployment before Serve answers 503 (with Retry-After)."
    )
    ingress_replicas: int = Field(2, ge=1, description="Ingress replicas (each a small fraction of a CPU).")
    call_timeout_s: float = Field(
        1800.0, gt=0, description="How long a pipeline step waits for one handle call before retrying it."
    )
    call_retries: int = Field(
        3, ge=0, le=20, description="Retries of a handle call whose replica died or was unavailable (backoff 1, 2, 4 s...)."
    )

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS


class RunConfig(_Section):
    """A whole TSO run: the matrix, the judge, pair formation, training, T stages."""

    name: str = "tso"
    run_dir: str = Field("runs/tso", description="Where every artifact of the run goes (made absolute at load).")
    seed: int = Field(43, description="Seeds every draw, keyed by (seed, stage, prompt id, role).")
    stages: int = Field(3, ge=1, description="T")
    matrix: MatrixConfig
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    baselines: list[str] = Field(
        default_factory=list, description="Baseline configs run beside TSO and put in its report (builtin:NAME or a path)."
    )

    @model_validator(mode="after")
    def _sources(self) -> RunConfig:
        self.mixtures()  # raises ValueError on bad weights or overlapping sources
        return self

    # -- helpers used by the steps

    def mixtures(self):
        """The alpha (positive) and gamma (negative) source mixtures of this run."""
        from tso.method.sources import resolve_sources

        p = self.pairs
        return resolve_sources(self.matrix, p.human_weight, p.positive_sources, p.negative_sources)

    def settle_app_name(self, purpose: str) -> str:
        """Give the Serve app a name of its own when none is configured, so a run, its baselines and a
        ``tso serve`` of the same config never redeploy (or delete) each other's app on one cluster."""
        if not self.serve.app_name:
            self.serve.app_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"tso-{self.name}-{purpose}").strip("-")[:64]
        return self.serve.app_name

    def config_hash(self) -> str:
        from tso.io import json_digest

        # what the run computes: where and how it is served (ports, tokens, limits) does not change it
        return json_digest(self.model_dump(mode="json", exclude={"serve"}))

    def require_model_dirs(self, source: str = "<config>") -> None:
        """Check local model directories when a step needs them (not at load, so configs validate before
        the matrix is built). Hub ids are resolved by ``from_pretrained`` when a model loads."""
        for i, m in enumerate(self.matrix.models):
            if is_hub_id(m.path):
                continue
            p = Path(m.path)
            if not (p / "config.json").is_file():
                hint = " (build the embedded default with `tso zoo build`)" if str(tso_home()) in str(p) else ""
                raise ConfigError(
                    source, f"matrix.models[{i}].path", f"model {m.name!r}: no model directory at {p}{hint}"
                )


# ----------------------------------------------------------------------------- loading

_VAR = re.compile(r"\$\{(\w+)\}")
_PATH_FIELDS = (("run_dir",), ("judge", "path"), ("judge", "feedback"), ("judge", "held_out"), ("pairs", "prompts"),
                ("eval", "prompts"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_LOCAL_PREFIXES = ("/", "./", "../", "~", "${")


def is_hub_id(path: str) -> bool:
    """``org/name`` that is not a local path: a Hugging Face Hub id. Local paths are absolute once a
    config is loaded, so after loading this only answers True for what ``_model_path`` kept as an id."""
    return not path.startswith(_LOCAL_PREFIXES) and bool(_HUB_ID.match(path))


def _expand(value: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name == "TSO_HOME":
            return str(tso_home())
        if name == "TSO_CONFIGS":  # the configs (and example prompts) shipped in the package
            return str(Path(__file__).parent / "configs")
        if name not in os.environ:
            raise KeyError(name)
        return os.environ[name]

    return os.path.expanduser(_VAR.sub(sub, value))


def _absolute(value: str, base: Path) -> str:
    p = Path(_expand(value))
    return str(p if p.is_absolute() else (base / p).resolve())


def _model_path(value: str, base: Path) -> str:
    """A local path (starts with /, ./, ~ or ${...}, or exists) made absolute; else a hub id kept as is."""
    if not value.startswith(_LOCAL_PREFIXES) and _HUB_ID.match(value) and not (base / value).exists():
        return value
    return _absolute(value, base)


def _is_jinja(text: str) -> bool:
    return "{%" in text or "{{" in text


def _chat_template(value: str | None, base: Path, source: str, field: str) -> str | None:
    """A chat template is Jinja text, or the path of a file holding it (read now, so it travels with
    the config to every Ray worker)."""
    if value is None or _is_jinja(value):
        return value
    path = Path(_absolute(value, base))
    if not path.is_file():
        raise ConfigError(source, field, f"{value!r} is neither a Jinja template nor a file ({path} does not exist)")
    text = path.read_text(encoding="utf-8")
    if not _is_jinja(text):
        raise ConfigError(source, field, f"{path} holds no Jinja template ({{% ... %}} or {{{{ ... }}}})")
    return text


def _normalise_paths(cfg: RunConfig, base: Path, source: str) -> RunConfig:
    """Expand ${VAR}/~ and make paths absolute (a `ray job` driver runs in a temporary copy)."""
    try:
        for field in _PATH_FIELDS:
            obj = cfg
            for part in field[:-1]:
                obj = getattr(obj, part)
            value = getattr(obj, field[-1])
            if value is not None:
                setattr(obj, field[-1], _model_path(value, base) if field == ("judge", "path") else _absolute(value, base))
        for i, m in enumerate(cfg.matrix.models):
            m.path = _model_path(m.path, base)
            m.chat_template = _chat_template(m.chat_template, base, source, f"matrix.models[{i}].chat_template")
        cfg.judge.chat_template = _chat_template(cfg.judge.chat_template, base, source, "judge.chat_template")
    except KeyError as e:
        raise ConfigError(source, "paths", f"environment variable {e.args[0]} is not set") from None
    return cfg


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> RunConfig:
    """Validate a dict into a RunConfig, turning pydantic errors into ConfigError with file and field."""
    if not isinstance(data, dict):
        raise ConfigError(source, "", f"expected a mapping at the top level, got {type(data).__name__}")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        problem = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            problem = "unknown key"
        more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
        raise ConfigError(source, _loc(tuple(err["loc"])), problem + more) from None
    return _normalise_paths(cfg, base_dir or Path.cwd(), source)


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a run config from YAML. Relative paths in it are taken relative to the current directory."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(source, "", "no such file")
    data = _read_yaml(path, source, seen=())
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return parse_config(data, source)


def resolve_config_ref(ref: str, relative_to: Path | None = None) -> Path:
    """`builtin:NAME` is a config shipped in tso/configs; anything else is a path."""
    if ref.startswith("builtin:"):
        return builtin_config_path(ref.removeprefix("builtin:"))
    p = Path(_expand(ref))
    return p if p.is_absolute() or relative_to is None else (relative_to / p)


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, mapping by mapping (lists and scalars are replaced)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _chain(path: Path, source: str, seen: tuple = ()) -> list[dict]:
    """The own keys of a config file and of every file it `extends`, the file itself first."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"not valid YAML: {e}") from None
    if not isinstance(data, dict) or "extends" not in data:
        return [data]
    ref = data.pop("extends")
    parent = resolve_config_ref(str(ref), path.parent)
    if not parent.is_file():
        raise ConfigError(source, "extends", f"no config at {parent}")
    if parent.resolve() in seen:
        raise ConfigError(source, "extends", f"circular extends through {parent}")
    return [data, *_chain(parent, str(parent), (*seen, path.resolve()))]


def _merge_chain(chain: list[dict]) -> dict:
    out: dict = {}
    for data in reversed(chain):
        out = deep_merge(out, data)
    return out


def _read_yaml(path: Path, source: str, seen: tuple = ()) -> dict:
    """Read a YAML config; `extends: <ref>` deep-merges this file over another config."""
    chain = _chain(path, source, seen)
    return chain[0] if len(chain) == 1 else _merge_chain(chain)


#: Keys of a baseline file that say where and what it is, not how its method differs.
BASELINE_OWN_KEYS = ("name", "run_dir", "baselines")


def method_overrides(ref: str) -> tuple[str, dict]:
    """(name, overrides) of a baseline config: what its file and the files between it and the config it
    finally extends change. Run beside a main run, a baseline is the main config with only these
    applied, so the matrix, prompts, seed and ``--set`` overrides stay the main run's."""
    path = resolve_config_ref(ref)
    if not path.is_file():
        raise ConfigError(str(path), "", "no such file")
    chain = _chain(path, str(path))
    if len(chain) < 2:
        raise ConfigError(str(path), "extends", "a baseline config must `extends:` the config it changes")
    merged = _merge_chain(chain[:-1])
    name = merged.get("name") or path.stem
    return str(name), {k: v for k, v in merged.items() if k not in BASELINE_OWN_KEYS}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items (VALUE is YAML) as {dotted key: value}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", item, "expects KEY=VALUE (a dotted key, a YAML value)")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError("--set", key, f"not a YAML value: {e}") from None
    return out


def load_config_ref(ref: str, sets: list[str] | None = None) -> tuple[RunConfig, str]:
    """A config named as on the command line (a path or builtin:NAME) with ``--set`` overrides;
    returns it and the file it came from."""
    path = resolve_config_ref(ref)
    return load_config(path, parse_overrides(sets or [])), str(path)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        data = data.setdefault(p, {})
    data[parts[-1]] = value


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def builtin_config_path(name: str) -> Path:
    """A config shipped inside the package (tso/configs/<name>.yaml)."""
    p = Path(__file__).parent / "configs" / f"{name}.yaml"
    if not p.is_file():
        have = sorted(q.stem for q in p.parent.glob("*.yaml"))
        raise ConfigError(str(p), "", f"no built-in config {name!r} (have {have})")
    return p
