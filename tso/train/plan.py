"""`tso train CONFIG --plan`: size a training run on paper, before renting devices.

Only the model's ``config.json`` is read: the model is built on the meta device (``from_config``, no
weights, no memory) to count its parameters. Per device it reports
- model states (weights, gradients, optimizer states) from DeepSpeed's own estimators,
  ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs`` (the numbers
  behind its ``*_all_cold`` printers), for the configured ZeRO stage, workers and offload settings;
  ZeRO 0/1 (no DeepSpeed estimator) and LoRA use the same byte counts, stated in ``model_states``;
- activations of one micro-batch (``activation_bytes``), with and without gradient checkpointing;
- the optimizer steps of a stage (``tso.train.minibatch.plan_stage``) for a number of pairs.
Activations are an estimate (an upper bound for padded batches at ``train.max_length``), not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tso.config import TrainConfig

GIB = 2**30
BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor default (CPU-side figures)


@dataclass
class ModelShape:
    total_params: int
    largest_layer_params: int  # the most parameters one module holds itself (ZeRO-3 gathers one at a time)
    trainable_params: int  # all of them, or the LoRA adapters
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width: kv heads x head dim
    vocab: int
    model_type: str


def count_params(model) -> tuple[int, int]:
    """(total, largest layer) as DeepSpeed's ``model_to_params`` counts them (shared parameters once).
    ``model.parameters()`` yields a shared parameter once, so this also works on the meta device, where
    every ``data_ptr()`` (DeepSpeed's de-duplication key) is 0."""
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return int(total), int(largest)


def model_shape(model_config, lora=None) -> ModelShape:
    """Build the model on the meta device from its config and count what the estimators need."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    total, largest = count_params(model)
    trainable = total
    if lora is not None:
        import warnings

        from tso.train.lora import apply_lora

        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = apply_lora(model, lora, seed=0)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        total += trainable  # the adapters are parameters too (frozen base + adapters)
    cfg = getattr(model_config, "get_text_config", lambda: model_config)()
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    return ModelShape(total_params=total, largest_layer_params=largest, trainable_params=int(trainable),
                      hidden=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers),
                      intermediate=int(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size),
                      heads=heads, kv_dim=kv_heads * head_dim, vocab=int(cfg.vocab_size),
                      model_type=str(getattr(cfg, "model_type", "?")))


# ----------------------------------------------------------------------------- model states


def model_states(shape: ModelShape, zero_stage: int, gpus_per_node: int, nodes: int, offload_optimizer: bool,
                 offload_param: bool) -> dict[str, Any]:
    """Bytes per device (GPU) and per node (CPU) for weights, gradients and optimizer states.

    ZeRO-2/3 full fine-tuning: DeepSpeed's estimators as they are. ZeRO 0/1 use their byte counts
    (2 for bf16 weights + 18 for bf16 and fp32 gradients, fp32 master weights and Adam's two moments),
    with the 16 optimizer bytes partitioned under ZeRO-1. LoRA: the estimator applied to the adapters,
    plus the frozen base in bf16 (2 bytes per parameter, partitioned under ZeRO-3)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus = gpus_per_node * nodes
    trained = shape.trainable_params
    frozen = shape.total_params - trained
    source = "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs"
    if zero_stage == 3:
        source = "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs"
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=trained, largest_layer_params=shape.largest_layer_params, num_gpus_per_node=gpus_per_node,
            num_nodes=nodes, cpu_offload=offload_optimizer, cpu_offload_params=offload_param, zero_init=True,
            additional_buffer_factor=BUFFER_FACTOR)
        frozen_gpu = 0 if offload_param else math.ceil(2 * frozen / gpus)
    elif zero_stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=trained, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload_optimizer,
            additional_buffer_factor=BUFFER_FACTOR)
        frozen_gpu = 2 * frozen
    else:
        source = "tso (DeepSpeed has no ZeRO-0/1 estimator): 2 + 2 + 16 bytes per parameter, 16 partitioned in ZeRO-1"
        optimizer_bytes = 16 * trained / (gpus if zero_stage == 1 else 1)
        gpu = int(2 * trained + 2 * trained + optimizer_bytes)
        cpu = int(trained * 4 * gpus_per_node * BUFFER_FACTOR)
        frozen_gpu = 2 * frozen
    if frozen:
        source += " on the LoRA adapters, + 2 bytes per frozen base parameter"
    return {"gpu_bytes": int(gpu + frozen_gpu), "cpu_bytes_per_node": int(cpu), "estimator": source,
            "offload_optimizer": offload_optimizer, "offload_param": offload_param}


# ----------------------------------------------------------------------------- activations


def activation_bytes(shape: ModelShape, sequences: int, seq_len: int, response_len: int, dtype_bytes: int,
                     attn_implementation: str, checkpointing: bool, chunked_head_bytes: int | None = None) -> int:
    """Activation memory of one micro-batch's forward + backward on one device (bytes), an estimate.

    Per token, a decoder layer keeps for the backward about 5h + 2kv + 4i values (h hidden, kv the key/value
    width, i the MLP width: the two norm inputs and outputs, q/k/v, the attention output, gate, up, their
    activation and product); eager attention also keeps the softmax (heads x seq_len per token).
    Checkpointing keeps each layer's input (h per token) and recomputes one layer at a time. The LM head
    runs on response tokens only: fp32 logits and their softmax (response tokens x vocab x 8 bytes),
    or at most ``chunked_head_bytes`` when the head is chunked (tso.method.logprobs)."""
    tokens = sequences * seq_len
    per_layer_token = 5 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate
    if attn_implementation == "eager":
        per_layer_token += shape.heads * seq_len
    one_layer = tokens * per_layer_token * dtype_bytes
    if checkpointing:
        layers = shape.layers * tokens * shape.hidden * dtype_bytes + one_layer
    else:
        layers = shape.layers * one_layer
    embeddings = 2 * tokens * shape.hidden * dtype_bytes  # embedding output, final norm
    head = sequences * response_len * shape.vocab * 8
    if chunked_head_bytes is not None:
        head = min(head, chunked_head_bytes)
    return int(layers + embeddings + head)


def chunked_head_limit(zero_stage: int) -> int | None:
    """What the chunked LM head holds at most (its chunk and the softmax it keeps), if tso has one; a
    ZeRO-3 partitioned head runs unchunked."""
    if zero_stage == 3:
        return None
    try:
        from tso.method.logprobs import LOGITS_CHUNK_BYTES, LOGITS_KEEP_BYTES
    except ImportError:
        return None
    return int(LOGITS_CHUNK_BYTES + LOGITS_KEEP_BYTES)


# ----------------------------------------------------------------------------- the plan


@dataclass
class TrainingPlan:
    model: dict[str, Any]
    setup: dict[str, Any]
    model_states: dict[str, Any]
    activations: dict[str, Any]
    per_device: dict[str, Any]
    steps: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(train: TrainConfig, model_config, num_pairs: int, gpus_per_node: int | None = None,
              device_memory_gib: float = 80.0, stage: int = 1) -> TrainingPlan:
    from tso.train.deepspeed_config import deepspeed_config, offload_devices
    from tso.train.minibatch import plan_stage

    workers = train.num_workers
    per_node = gpus_per_node or min(workers, 8)
    if workers % per_node:
        raise ValueError(f"train.num_workers ({workers}) is not a multiple of --gpus-per-node ({per_node})")
    nodes = workers // per_node
    shape = model_shape(model_config, train.lora)
    offload_opt, offload_par = offload_devices(deepspeed_config(train, world_size=workers, use_gpu=True))
    states = model_states(shape, train.zero_stage, per_node, nodes, offload_opt, offload_par)
    dtype_bytes = 2 if train.use_gpu else 4
    sequences, seq_len = 2 * train.micro_batch, train.max_length  # chosen + rejected rows, padded to max_length
    response_len = max(1, seq_len // 2)
    head_limit = chunked_head_limit(train.zero_stage)
    acts = {ckpt: activation_bytes(shape, sequences, seq_len, response_len, dtype_bytes, train.attn_implementation,
                                   ckpt, head_limit) for ckpt in (False, True)}
    activations = {"without_checkpointing_bytes": acts[False], "with_checkpointing_bytes": acts[True],
                   "sequences": sequences, "seq_len": seq_len, "response_len": response_len,
                   "dtype_bytes": dtype_bytes, "chunked_head_bytes": head_limit}
    chosen = acts[train.gradient_checkpointing]
    total = states["gpu_bytes"] + chosen
    per_device = {"configured_bytes": total, "gradient_checkpointing": train.gradient_checkpointing,
                  "other_setting_bytes": states["gpu_bytes"] + acts[not train.gradient_checkpointing],
                  "device_memory_bytes": int(device_memory_gib * GIB), "fits": total <= device_memory_gib * GIB}
    sp = plan_stage(num_pairs, train, stage)
    steps = {"pairs": num_pairs, "minibatches": len(sp.minibatches), "epochs": sp.epochs,
             "minibatch_sizes": [len(m) for m in sp.minibatches], "steps_per_epoch": sp.steps_per_epoch,
             "total_steps": sp.total_steps, "global_batch": train.global_batch, "micro_batch": train.micro_batch,
             "grad_accum": train.grad_accum, "reference_passes": len(sp.minibatches)}
    notes = ["model states assume bf16 weights with fp32 master weights and Adam states (the GPU layout)"]
    if not train.use_gpu:
        notes.append("train.use_gpu is false: on CPU tso trains in fp32 (about 16 bytes per trained parameter "
                     "plus fp32 activations, counted above at 4 bytes)")
    if train.attn_implementation == "eager":
        notes.append("eager attention keeps heads x seq_len softmax values per token; sdpa does not")
    setup = {"zero_stage": train.zero_stage, "workers": workers, "gpus_per_node": per_node, "nodes": nodes,
             "lora": train.lora.model_dump(mode="json") if train.lora else None,
             "attn_implementation": train.attn_implementation, "max_length": train.max_length}
    return TrainingPlan(model=asdict(shape), setup=setup, model_states=states, activations=activations,
                        per_device=per_device, steps=steps, notes=notes)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(plan: TrainingPlan) -> str:
    m, s, st, a, d, k = plan.model, plan.setup, plan.model_states, plan.activations, plan.per_device, plan.steps
    lora = f", LoRA r={s['lora']['r']} ({m['trainable_params'] / 1e6:.1f}M trainable)" if s["lora"] else ""
    lines = [
        f"model: {m['model_type']}, {m['total_params'] / 1e9:.3f}B parameters ({m['total_params']:,}), "
        f"largest layer {m['largest_layer_params'] / 1e6:.1f}M, {m['layers']} layers, hidden {m['hidden']}, "
        f"vocabulary {m['vocab']:,}{lora}",
        f"setup: ZeRO-{s['zero_stage']}, {s['workers']} workers ({s['nodes']} node(s) x {s['gpus_per_node']}), "
        f"micro_batch {k['micro_batch']} pairs, max_length {s['max_length']}, attention {s['attn_implementation']}",
        f"model states per device: {gib(st['gpu_bytes'])} (CPU per node: {gib(st['cpu_bytes_per_node'])}; "
        f"offload optimizer {st['offload_optimizer']}, params {st['offload_param']})",
        f"  from {st['estimator']}",
        f"activations per device ({a['sequences']} sequences x {a['seq_len']} tokens): "
        f"{gib(a['without_checkpointing_bytes'])} without gradient checkpointing, "
        f"{gib(a['with_checkpointing_bytes'])} with",
        f"total per device: {gib(d['configured_bytes'])} as configured (gradient_checkpointing "
        f"{d['gradient_checkpointing']}), {gib(d['other_setting_bytes'])} with it "
        f"{'off' if d['gradient_checkpointing'] else 'on'}; "
        f"{'fits' if d['fits'] else 'does NOT fit'} in {gib(d['device_memory_bytes'])}",
        f"steps: {k['pairs']} pairs -> {k['minibatches']} mini-batches {k['minibatch_sizes']}, {k['epochs']} epochs, "
        f"steps per epoch {k['steps_per_epoch']}, {k['total_steps']} optimizer steps "
        f"(global_batch {k['global_batch']} = {k['micro_batch']} x {s['workers']} workers x {k['grad_accum']} "
        f"accumulation), {k['reference_passes']} reference passes",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def read_model_config(path: str | Path, options: dict[str, Any] | None = None):
    """A model's config from a model directory, a config.json file, or a hub id (from the local cache)."""
    from transformers import AutoConfig

    p = Path(str(path)).expanduser()
    if p.is_file():
        return AutoConfig.from_pretrained(str(p.parent) if p.name == "config.json" else str(p))
    if p.is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no config.json (the plan needs only the model's config.json)")
    from tso.models.checkpoint import load_config

    try:
        return load_config(str(path), options)
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the model's config.json ({e}); pass --base DIR_OR_CONFIG_JSON") from None


def count_pairs(path: str | Path) -> int:
    """Rows in a pairs file (Parquet metadata, or lines of JSONL), without tokenizing."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such pairs file")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(str(p)).metadata.num_rows)
    with p.open("rb") as f:
        return sum(1 for line in f if line.strip())
