"""Per-GPU memory plan of a training run, checked before any GPU time is spent.

A 9B full fine-tune that runs out of memory fails minutes into the job, after model loading, on every rank of a
multi-node allocation. `plan_for_config(cfg, gpus_per_node, nodes)` predicts the peak per-GPU memory from the model
shape and the run config alone (no weights, no GPU) and says what to change when it does not fit.

Per-GPU terms (N = GPUs in total, P = parameters, L = parameters of the largest single module):

* Model states (what DeepSpeed's own estimator covers). Mixed-precision Adam keeps 2-byte bf16 weights, bf16 gradients
  (DeepSpeed accumulates in the model dtype unless `data_types.grad_accum_dtype` says fp32) and 12 bytes of fp32 state
  (master weights, Adam m and v) per trained parameter. ZeRO-1 partitions the optimizer states, ZeRO-2 also the
  gradients, ZeRO-3 also the weights, each over N. ZeRO-3 has two transient terms on top of the shards:
  the gathered working set during forward/backward (the full bf16 weights of the module being computed plus its full
  gradient before reduce-scatter: 2L + 2L bytes), and during `optimizer.step` the fp32 copy of the gradients of one
  optimizer sub-group (4 bytes x min(sub_group_size, P/N)). They never coexist, so the peak takes the larger.
  Offloading the optimizer moves gradients and optimizer states to host RAM; offloading parameters moves the weight
  shards too; the working set stays on the GPU.
* Activations, per token and decoder layer (counted from the tensors autograd saves in the transformers 5 Llama and
  Gemma2 layers; tests/test_plan.py checks the formula against saved-tensor hooks on tiny models). With h the hidden
  size, q = heads x head_dim, kv = kv_heads x head_dim, f the MLP width, a the heads, s the attended length, b the
  bytes of the compute dtype:
    - RMSNorm saves its fp32 input (4h) and 1/rms (4); Llama also its b-byte normalised output (bh), Gemma2 the fp32
      one (4h); a norm feeding a projection adds the projection input (bh). Llama: 2 norms, Gemma2: 4 norms.
    - MLP (gated): gate output, activation output, up output, their product: 4bf.
    - Attention, flash-attention-2 / SDPA kernels: q, k, v, output (b(2q + 2kv)) and the fp32 log-sum-exp (4a).
      No score matrix is stored: memory is linear in s. SDPA with a mask (padding, packing) repeats k and v to the
      q heads and keeps the mask (bs per token: once for padding, per layer for packed rows).
    - Attention, eager: q, repeated k and v, output (4bq) plus per head and attended position the fp32 softmax (4)
      and its b-byte copy (b), plus the b-byte tanh output when Gemma2 soft-caps logits: quadratic in s. Packed rows
      in eager mode attend over the whole row (block-diagonal mask), so s is the packed length.
  Outside the layers: token ids (8 bytes), the final norm, RoPE cos/sin, a shared SDPA padding mask. The 3-class head's logits are negligible;
  the vocabulary-sized embedding costs nothing per token (it saves only ids) but its weight and dense gradient are
  the largest ZeRO-3 working set (L = vocab x hidden for Gemma2/Llama 3).
  With gradient checkpointing only each layer's input (bh per token and layer) is kept, plus one layer recomputed in
  backward. Backward also holds activation gradients of one layer (about b(h + 2f) per token, 4as in eager mode).
  LoRA: the full fine-tuning activation figure is used as an upper bound (frozen projections need not keep inputs).
* Buffers: CUDA context, cuBLAS workspaces and NCCL buffers (a fixed allowance), ZeRO communication buckets from the
  DeepSpeed JSON, and a fragmentation margin for the caching allocator.

Tokens per micro-batch: `data.max_tokens` when packing, else `micro_batch_size x max_length` (x2 with full swap).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from training.architectures import ParamCounts, count_parameters, model_config_for

GIB = 2**30
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# CUDA context (~0.5 GiB on A100 with lazy module loading), cuBLAS/cuDNN workspaces and NCCL channel buffers
# (~0.5-1 GiB with IB): measured ranges from nvidia-smi on idle initialised ranks, rounded up.
FIXED_OVERHEAD_GIB = 1.5
# The caching allocator cannot always reuse freed blocks (ZeRO-3 allocates and frees gathered layers every step).
FRAGMENTATION = 0.10
# DeepSpeed's estimator multiplies host RAM by this for pinned-buffer slack; we report host RAM the same way.
DS_BUFFER_FACTOR = 1.5
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """The plan does not fit; the message lists the changes that would make it fit."""


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Shape:
    """What the memory formulas need from a transformers config."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    softcap: bool  # Gemma2 attention logit soft-capping (one more saved s^2 tensor in eager mode)

    @property
    def gemma_norm(self) -> bool:
        # Gemma RMSNorm multiplies by (1 + w) in fp32 and has pre- and post-norms around attention and MLP.
        return self.model_type.startswith("gemma")

    @staticmethod
    def of(config, name: str) -> "Shape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Shape(
            name=name, model_type=config.model_type, hidden=config.hidden_size, layers=config.num_hidden_layers,
            heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
            intermediate=config.intermediate_size, vocab=config.vocab_size,
            softcap=bool(getattr(config, "attn_logit_softcapping", None)),
        )


@dataclass(frozen=True)
class ZeroKnobs:
    """The DeepSpeed JSON values that change memory ("auto" resolved like training.config does)."""

    stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket_size: int = 500_000_000  # DeepSpeed defaults when the JSON is silent
    prefetch_bucket_size: int = 50_000_000
    persistence_threshold: int = 100_000
    sub_group_size: int = 1_000_000_000
    grad_bytes: int = 2  # data_types.grad_accum_dtype (None: the model dtype)


@dataclass(frozen=True)
class PlanInputs:
    shape: Shape
    counts: ParamCounts
    dtype_bytes: int  # 2 for bf16/fp16, 4 for fp32
    gradient_checkpointing: bool
    attn_implementation: str  # flash_attention_2, sdpa or eager
    micro_batch_size: int
    max_length: int
    packing: bool
    max_tokens: int
    rows_per_example: int  # 2 with data.full_swap
    zero: ZeroKnobs
    lora_enabled: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    qlora: bool
    head_params: int
    gpu_memory_gib: float
    gpus_per_node: int
    nodes: int
    source: str = ""  # the config file, for the render

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def tokens(self) -> int:
        return self.max_tokens if self.packing else self.micro_batch_size * self.rows_per_example * self.max_length

    @property
    def attended(self) -> int:
        """Positions one query attends over in the kernel: the whole packed row in eager mode (masked), else one row."""
        return self.max_tokens if self.packing else self.max_length


# ---------------------------------------------------------------------------------------------------- formulas


def norm_bytes(s: Shape, b: int, feeds_linear: bool) -> int:
    """Bytes per token one RMSNorm saves (see the module docstring)."""
    kept = 4 * s.hidden + 4 + (4 * s.hidden if s.gemma_norm else b * s.hidden)
    return kept + (b * s.hidden if feeds_linear else 0)


def attention_bytes(s: Shape, b: int, impl: str, attended: int, mask: str) -> int:
    """`mask`: "none" (no padding, causal kernel), "shared" (padded rows: one mask for all layers) or "per_layer"
    (packed rows: transformers 5 builds the block-diagonal SDPA mask in each layer; eager and flash never keep it)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    if impl == "eager":
        per_score = 4 + (b if b != 4 else 0) + (b if s.softcap else 0)  # fp32 softmax, its copy, tanh output
        return 4 * b * q + s.heads * attended * per_score
    if impl != "sdpa" or mask == "none":
        return b * (2 * q + 2 * kv) + 4 * s.heads
    # masked SDPA: transformers repeats kv heads to q heads, and the kernel saves the b-byte mask row of each token
    return b * 4 * q + 4 * s.heads + (b * attended if mask == "per_layer" else 0)


def layer_bytes_per_token(s: Shape, b: int, impl: str, attended: int, mask: str) -> int:
    """Activation bytes one decoder layer saves for backward, per token."""
    norms = (2 * norm_bytes(s, b, True) + 2 * norm_bytes(s, b, False)) if s.gemma_norm else 2 * norm_bytes(s, b, True)
    return norms + attention_bytes(s, b, impl, attended, mask) + 4 * b * s.intermediate


def outside_bytes_per_token(s: Shape, b: int, impl: str, attended: int, mask: str) -> int:
    """Token ids, final norm, RoPE cos/sin, and a shared SDPA padding mask (one b-byte row per token)."""
    shared_mask = b * attended if impl == "sdpa" and mask == "shared" else 0
    return 8 + norm_bytes(s, b, False) + 2 * b * s.head_dim + shared_mask


def saved_activation_bytes(s: Shape, b: int, impl: str, tokens: int, attended: int, mask: str,
                           checkpointing: bool) -> int:
    """Bytes autograd holds at the end of the forward pass (without checkpointing: every layer's saved tensors;
    with it: each layer's input). Compared with saved-tensor hooks in tests/test_plan.py."""
    per_layer = b * s.hidden if checkpointing else layer_bytes_per_token(s, b, impl, attended, mask)
    return tokens * (s.layers * per_layer + outside_bytes_per_token(s, b, impl, attended, mask))


def activation_peak_bytes(s: Shape, b: int, impl: str, tokens: int, attended: int, mask: str,
                          checkpointing: bool) -> int:
    """Peak activation memory in backward: saved tensors, one recomputed layer, one layer's activation gradients."""
    saved = saved_activation_bytes(s, b, impl, tokens, attended, mask, checkpointing)
    recompute = tokens * layer_bytes_per_token(s, b, impl, attended, mask) if checkpointing else 0
    grads = tokens * (b * (s.hidden + 2 * s.intermediate) + (4 * s.heads * attended if impl == "eager" else 0))
    return saved + recompute + grads


def lora_params(counts: ParamCounts, targets: tuple[str, ...], r: int) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted nn.Linear (peft matches names by suffix)."""
    def hit(name: str) -> bool:
        return "all-linear" in targets or any(name == t or name.endswith("." + t) for t in targets)

    return sum(r * (lin.in_features + lin.out_features) for lin in counts.linears if hit(lin.name))


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class DeepSpeedEstimate:
    """DeepSpeed's estimate_zero{2,3}_model_states_mem_needs for this run's offload setting (bytes)."""

    function: str
    gpu_bytes: int
    cpu_bytes: int  # per node, including DeepSpeed's 1.5x buffer factor
    total_params: int
    largest_layer_params: int

    @property
    def gpu_gib(self) -> float:
        return self.gpu_bytes / GIB

    @property
    def cpu_gib(self) -> float:
        return self.cpu_bytes / GIB


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory in GiB. `total_gib` uses the activations of the configured checkpointing setting."""

    inputs: PlanInputs
    trained_params: int
    params_gib: float  # bf16 weight shard (+ ZeRO-3 persistent small tensors)
    grads_gib: float  # gradient shard
    optimizer_gib: float  # fp32 master weights + Adam m, v shards
    working_set_gib: float  # ZeRO-3: gathered largest module + its full gradient (forward/backward only)
    step_grads_gib: float  # fp32 gradients of one optimizer sub-group (optimizer.step only)
    activations_checkpointed_gib: float
    activations_full_gib: float
    buffers_gib: float
    cpu_gib_per_node: float  # host RAM for offloaded states (x1.5 like DeepSpeed), 0 without offload
    deepspeed_estimate: DeepSpeedEstimate | None
    advice: list[str] = field(default_factory=list)

    @property
    def activations_gib(self) -> float:
        ckpt = self.inputs.gradient_checkpointing
        return self.activations_checkpointed_gib if ckpt else self.activations_full_gib

    @property
    def shards_gib(self) -> float:
        return self.params_gib + self.grads_gib + self.optimizer_gib

    @property
    def model_states_gib(self) -> float:
        """Peak of params + grads + optimizer states on the GPU: what DeepSpeed's estimator covers."""
        return self.shards_gib + max(self.working_set_gib, self.step_grads_gib)

    @property
    def total_gib(self) -> float:
        backward = self.working_set_gib + self.activations_gib
        return self.shards_gib + max(backward, self.step_grads_gib) + self.buffers_gib

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.inputs.gpu_memory_gib

    @property
    def deepspeed_ratio(self) -> float | None:
        """model_states_gib / DeepSpeed's GPU estimate (only meaningful when every parameter is trained)."""
        if self.deepspeed_estimate is None or self.inputs.lora_enabled or self.deepspeed_estimate.gpu_bytes == 0:
            return None
        return self.model_states_gib / self.deepspeed_estimate.gpu_gib

    def require_fit(self) -> None:
        """Raise PlanError with the rendered plan and advice when the run would not fit."""
        if not self.fits:
            raise PlanError(f"the run does not fit in {self.inputs.gpu_memory_gib:g} GiB per GPU "
                            f"(planned {self.total_gib:.1f} GiB).\n\n{self.render()}")

    def render(self) -> str:
        return render(self)


def plan(inp: PlanInputs, advise: bool = True) -> MemoryPlan:
    """The memory plan for resolved inputs (see the module docstring for every term)."""
    s, c, z, b, n = inp.shape, inp.counts, inp.zero, inp.dtype_bytes, inp.gpus
    trained = (lora_params(c, inp.lora_targets, inp.lora_r) + inp.head_params) if inp.lora_enabled else (
        c.total + inp.head_params)
    frozen = c.total if inp.lora_enabled else 0
    # 4-bit NF4 weights: 0.5 byte + one fp32 absmax per 64-weight block; embeddings and norms stay in b bytes.
    frozen_bytes = (c.linear_params * (0.5 + 4 / 64) + (c.total - c.linear_params) * b) if inp.qlora else frozen * b
    weight_bytes = trained * b + frozen_bytes
    master = 0 if b == 4 else 4  # an fp32 model is its own master copy
    opt_per_param = master + 8

    param_div = n if z.stage == 3 else 1
    grad_div = n if z.stage >= 2 else 1
    opt_div = n if z.stage >= 1 else 1
    params = weight_bytes / param_div
    if z.stage == 3:
        params += c.persistent(z.persistence_threshold) * b  # small tensors stay whole on every rank
    grads = trained * z.grad_bytes / grad_div
    optimizer = trained * opt_per_param / opt_div
    step = 4 * trained / opt_div if b != 4 else 0  # fp32 gradient copy for the fp32 optimizer
    if z.stage == 3:
        step = 4 * min(z.sub_group_size, trained / n) if b != 4 else 0
    working = 0.0
    if z.stage == 3:
        largest_trained = c.largest_layer if not inp.lora_enabled else 0
        working = 2 * c.largest_layer + z.grad_bytes * largest_trained
    cpu = 0.0
    if z.offload_optimizer:  # gradient and optimizer shards live in host RAM; CPU Adam works on fp32 grads
        cpu += (optimizer + trained * 4 / grad_div) * inp.gpus_per_node
        grads, optimizer, step = 0.0, 0.0, 0.0
    if z.offload_params and z.stage == 3:
        cpu += params * inp.gpus_per_node
        params = 0.0

    mask = "per_layer" if inp.packing else ("shared" if inp.micro_batch_size * inp.rows_per_example > 1 else "none")
    args = (s, b, inp.attn_implementation, inp.tokens, inp.attended, mask)
    act_ckpt = activation_peak_bytes(*args, checkpointing=True)
    act_full = activation_peak_bytes(*args, checkpointing=False)
    act = act_ckpt if inp.gradient_checkpointing else act_full
    buckets = b * (z.reduce_bucket_size + (z.prefetch_bucket_size if z.stage == 3 else 0))
    states_peak = params + grads + optimizer + max(working, step)
    buffers = FIXED_OVERHEAD_GIB * GIB + buckets + FRAGMENTATION * (states_peak + act)

    result = MemoryPlan(
        inputs=inp, trained_params=trained, params_gib=params / GIB, grads_gib=grads / GIB,
        optimizer_gib=optimizer / GIB, working_set_gib=working / GIB, step_grads_gib=step / GIB,
        activations_checkpointed_gib=act_ckpt / GIB, activations_full_gib=act_full / GIB, buffers_gib=buffers / GIB,
        cpu_gib_per_node=cpu * DS_BUFFER_FACTOR / GIB, deepspeed_estimate=deepspeed_estimate(inp),
    )
    if advise and not result.fits:
        result.advice.extend(advice_for(inp))
    return result


def deepspeed_estimate(inp: PlanInputs) -> DeepSpeedEstimate | None:
    """DeepSpeed's own model-states estimator for the run's stage and offload setting (None for stages 0/1 or when
    deepspeed is not installed). Its print-out helpers (`*_all_cold`) call this same function for each option."""
    z, c = inp.zero, inp.counts
    try:
        if z.stage == 3:
            est = _deepspeed_module("deepspeed.runtime.zero.stage3").estimate_zero3_model_states_mem_needs
            cpu, gpu, _ = est(total_params=c.total + inp.head_params, largest_layer_params=c.largest_layer,
                              num_gpus_per_node=inp.gpus_per_node, num_nodes=inp.nodes,
                              cpu_offload=z.offload_optimizer, cpu_offload_params=z.offload_params, zero_init=True,
                              additional_buffer_factor=DS_BUFFER_FACTOR)
            name = "estimate_zero3_model_states_mem_needs"
        elif z.stage == 2:
            est = _deepspeed_module("deepspeed.runtime.zero.stage_1_and_2").estimate_zero2_model_states_mem_needs
            cpu, gpu = est(total_params=c.total + inp.head_params, num_gpus_per_node=inp.gpus_per_node,
                           num_nodes=inp.nodes, cpu_offload=z.offload_optimizer,
                           additional_buffer_factor=DS_BUFFER_FACTOR)
            name = "estimate_zero2_model_states_mem_needs"
        else:
            return None
    except ImportError:
        return None
    return DeepSpeedEstimate(name, int(gpu), int(cpu), c.total + inp.head_params, c.largest_layer)


def _deepspeed_module(name: str):
    """Import a DeepSpeed module without its "Setting accelerator to CPU" notice, which it prints to stdout on
    machines without a GPU (login nodes, where plans are made); planning needs no accelerator. Only that record is
    dropped, and only during this import."""
    import importlib
    import logging

    if name in sys.modules:
        return sys.modules[name]

    def keep(record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()

    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.addFilter(keep)
    try:
        return importlib.import_module(name)
    finally:
        ds_logger.removeFilter(keep)


# ---------------------------------------------------------------------------------------------------- advice


def advice_for(inp: PlanInputs) -> list[str]:
    """Concrete changes (run-config overrides or launch flags) that make the run fit, each re-planned: every single
    change that helps, then the cheapest combination that fits (in the order: recompute, kernels, smaller
    micro-batches, offload, more nodes, LoRA)."""
    out = []
    for step in _STEPS:
        change = step(inp)
        if change is not None:
            label, changed = change
            out.append(_line(label, _total(changed), inp.gpu_memory_gib))
    labels, state = [], inp
    for step in _STEPS:
        if _total(state) <= inp.gpu_memory_gib:
            break
        change = step(state)
        if change is not None and _total(change[1]) < _total(state):
            labels.append(change[0].split(" (")[0])
            state = change[1]
    if len(labels) > 1:
        out.append(_line("together: " + " + ".join(labels), _total(state), inp.gpu_memory_gib))
    if _total(state) > inp.gpu_memory_gib:
        out.append("no combination of the above fits: use GPUs with more memory or a smaller model")
    return out


def _total(inp: PlanInputs) -> float:
    return plan(inp, advise=False).total_gib


def _line(what: str, gib: float, capacity: float) -> str:
    return f"{what}: {gib:.1f} GiB per GPU ({'fits' if gib <= capacity else 'still too much'})"


Change = Optional[tuple[str, PlanInputs]]


def _checkpointing(inp: PlanInputs) -> Change:
    if inp.gradient_checkpointing:
        return None
    return "model.gradient_checkpointing=true", dataclasses.replace(inp, gradient_checkpointing=True)


def _flash(inp: PlanInputs) -> Change:
    if inp.attn_implementation != "eager":
        return None
    return ("model.attn_implementation=flash_attention_2 (pip install flash-attn; Ampere or newer)",
            dataclasses.replace(inp, attn_implementation="flash_attention_2"))


def _smaller_batch(inp: PlanInputs) -> Change:
    """The largest micro-batch (or packed length) that fits, else the smallest one."""
    if inp.packing:
        options = [max(t, inp.max_length) for t in range(inp.max_tokens - 256, inp.max_length - 256, -256)]
        key, note = "max_tokens", ""
    else:
        options = list(range(inp.micro_batch_size - 1, 0, -1))
        key, note = "micro_batch_size", " (raise train.gradient_accumulation_steps to keep the batch)"
    if not options:
        return None
    chosen = next((v for v in options if _total(dataclasses.replace(inp, **{key: v})) <= inp.gpu_memory_gib),
                  options[-1])
    return f"data.{key}={chosen}{note}", dataclasses.replace(inp, **{key: chosen})


def _offload(inp: PlanInputs) -> Change:
    z = inp.zero
    if z.stage < 3:
        return ("deepspeed.config=configs/deepspeed/zero3.json (partition the weights too)",
                dataclasses.replace(inp, zero=dataclasses.replace(z, stage=3)))
    if z.offload_optimizer and z.offload_params:
        return None
    changed = dataclasses.replace(inp, zero=dataclasses.replace(z, offload_optimizer=True, offload_params=True))
    ram = plan(changed, advise=False).cpu_gib_per_node
    return (f"deepspeed.config=configs/deepspeed/zero3_offload.json (optimizer and weights in host RAM: "
            f"~{ram:.0f} GiB per node; slower steps)", changed)


def _more_nodes(inp: PlanInputs, max_nodes: int = 64) -> Change:
    """The fewest nodes (same GPUs per node) that fit, if any up to max_nodes (sharding only shrinks model states)."""
    nodes = next((n for n in range(inp.nodes + 1, max_nodes + 1)
                  if _total(dataclasses.replace(inp, nodes=n)) <= inp.gpu_memory_gib), None)
    if nodes is None:
        return None
    return f"--nodes {nodes} ({nodes * inp.gpus_per_node} GPUs in total)", dataclasses.replace(inp, nodes=nodes)


def _lora(inp: PlanInputs) -> Change:
    if inp.lora_enabled:
        return None
    return (f"lora.enabled=true (r=16 on {', '.join(DEFAULT_LORA_TARGETS)}; the *_lora.yaml presets)",
            dataclasses.replace(inp, lora_enabled=True, lora_r=16, lora_targets=DEFAULT_LORA_TARGETS))


_STEPS = (_checkpointing, _flash, _smaller_batch, _offload, _more_nodes, _lora)


# ---------------------------------------------------------------------------------------------------- from a config


def _dtype_bytes(dtype: str | None) -> int:
    d = (dtype or "auto").lower()
    if d in ("fp32", "float32"):
        return 4
    if d in ("auto", "bf16", "bfloat16", "fp16", "float16"):
        return 2  # "auto" trains in bf16 on GPUs (A100 and newer)
    raise ValueError(f"model.dtype: unknown dtype {dtype!r} (bf16, fp16, fp32 or auto)")


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else PROJECT_ROOT / p


def _auto(value: Any, default: int) -> int:
    return default if value in (None, "auto") else int(value)


def zero_knobs(ds_cfg: Any, hidden: int, dtype_bytes: int) -> ZeroKnobs:
    """Read the DeepSpeed JSON named by cfg.deepspeed.config; the run config's explicit fields win when set."""
    raw: dict = {}
    path = getattr(ds_cfg, "config", None)
    if path:
        p = _resolve(path)
        if not p.is_file():
            raise ValueError(f"deepspeed.config: {path} not found (looked in the cwd and {PROJECT_ROOT})")
        raw = json.loads(p.read_text())
    zero = raw.get("zero_optimization", {})
    defaults = ZeroKnobs()

    def flag(attr: str, key: str) -> bool:
        mine = getattr(ds_cfg, attr, None)
        if mine is not None:
            return bool(mine)
        return (zero.get(key) or {}).get("device", "none") not in (None, "none", "auto")

    stage = getattr(ds_cfg, "zero_stage", None)
    persistence = getattr(ds_cfg, "param_persistence_threshold", None)
    grad_dtype = (raw.get("data_types") or {}).get("grad_accum_dtype")
    return ZeroKnobs(
        stage=int(stage if stage is not None else zero.get("stage", 0)),
        offload_optimizer=flag("offload_optimizer", "offload_optimizer"),
        offload_params=flag("offload_params", "offload_param"),
        # "auto" values as HF/training.config fill them: hidden^2, 0.9 hidden^2, 10 hidden
        reduce_bucket_size=_auto(zero.get("reduce_bucket_size", defaults.reduce_bucket_size), hidden * hidden),
        prefetch_bucket_size=_auto(zero.get("stage3_prefetch_bucket_size", defaults.prefetch_bucket_size),
                                   int(0.9 * hidden * hidden)),
        persistence_threshold=persistence if persistence is not None else _auto(
            zero.get("stage3_param_persistence_threshold", defaults.persistence_threshold), 10 * hidden),
        sub_group_size=_auto(zero.get("sub_group_size"), defaults.sub_group_size),
        grad_bytes=4 if grad_dtype in ("fp32", "float32", "float") else dtype_bytes,
    )


def _head_params(model_cfg: Any, hidden: int) -> int:
    head = getattr(model_cfg, "head", None)
    if head is not None and getattr(head, "type", "linear") == "mlp":
        width = getattr(head, "mlp_hidden", 0) or hidden
        return hidden * width + width + width * 3 + 3
    return hidden * 3 + 3


def _attn_for(model_cfg: Any) -> str:
    impl = getattr(model_cfg, "attn_implementation", None)
    # The plan is for the training GPUs (Ampere+): transformers picks flash-attention 2 there when the flash-attn
    # extra is installed; the render states this assumption and advice names it when eager would not fit.
    return impl or "flash_attention_2"


def inputs_from_config(cfg: Any, gpus_per_node: int, nodes: int) -> PlanInputs:
    """PlanInputs from a run config (attribute access only: a training.config.RunConfig or any look-alike)."""
    if gpus_per_node < 1 or nodes < 1:
        raise ValueError(f"--gpus and --nodes must be >= 1, got {gpus_per_node} and {nodes}")
    m, d, lo = cfg.model, cfg.data, cfg.lora
    tiny = getattr(m, "tiny", None)
    if tiny and "vocab_size" not in tiny and getattr(d, "tokenizer", None) == "train_bpe":
        # the tiny presets take their vocabulary from the BPE tokenizer trained at run time
        m = dataclasses.replace(m, tiny={**tiny, "vocab_size": d.bpe_vocab_size}) if dataclasses.is_dataclass(m) else \
            _with(m, tiny={**tiny, "vocab_size": d.bpe_vocab_size})
    config = model_config_for(m)
    name = (getattr(m, "architecture", None) or getattr(m, "name_or_path", None) or getattr(m, "init_from", None)
            or f"tiny {config.model_type}")
    shape = Shape.of(config, name)
    b = _dtype_bytes(getattr(m, "dtype", "auto"))
    fmt = getattr(d, "format", None)
    max_length = int(getattr(fmt, "max_length", None) or getattr(d, "max_length"))
    packing = bool(getattr(d, "packing", False))
    return PlanInputs(
        shape=shape, counts=count_parameters(config), dtype_bytes=b,
        gradient_checkpointing=bool(m.gradient_checkpointing), attn_implementation=_attn_for(m),
        micro_batch_size=int(d.micro_batch_size), max_length=max_length, packing=packing,
        max_tokens=int(getattr(d, "max_tokens", 0) or 0) if packing else 0,
        rows_per_example=2 if getattr(d, "full_swap", False) else 1,
        zero=zero_knobs(cfg.deepspeed, shape.hidden, b),
        lora_enabled=bool(getattr(lo, "enabled", False)), lora_r=int(getattr(lo, "r", 16)),
        lora_targets=tuple(getattr(lo, "target_modules", DEFAULT_LORA_TARGETS)), qlora=bool(getattr(lo, "qlora", False)),
        head_params=_head_params(m, shape.hidden),
        gpu_memory_gib=float(getattr(getattr(cfg, "hardware", None), "gpu_memory_gb", 80.0)),
        gpus_per_node=gpus_per_node, nodes=nodes,
    )


def _with(obj: Any, **changes: Any) -> Any:
    """A shallow copy of a plain attribute object (e.g. types.SimpleNamespace) with some attributes changed."""
    import copy

    out = copy.copy(obj)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def plan_for_config(cfg: Any, gpus_per_node: int, nodes: int = 1) -> MemoryPlan:
    """Per-GPU memory plan of a run config on `nodes` x `gpus_per_node` GPUs (see MemoryPlan, render, require_fit)."""
    return plan(inputs_from_config(cfg, gpus_per_node, nodes))


# ---------------------------------------------------------------------------------------------------- rendering


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def render(p: MemoryPlan) -> str:
    inp, z, s = p.inputs, p.inputs.zero, p.inputs.shape
    dtype = {2: "bf16", 4: "fp32"}[inp.dtype_bytes]
    method = (f"QLoRA r={inp.lora_r}" if inp.qlora else f"LoRA r={inp.lora_r}") if inp.lora_enabled else "full fine-tuning"
    offload = ", ".join(x for x, on in (("optimizer", z.offload_optimizer), ("params", z.offload_params)) if on)
    batch = (f"packed rows of {inp.max_tokens} tokens" if inp.packing else
             f"{inp.micro_batch_size * inp.rows_per_example} rows x {inp.max_length} tokens")
    ckpt = "on" if inp.gradient_checkpointing else "off"
    shard = f"1/{inp.gpus}"
    weights = "NF4 projections + bf16 rest" if inp.qlora else f"{dtype} weights"
    lines = [
        f"Memory plan: {s.name} ({_b(p.inputs.counts.total)} params, largest module {_b(p.inputs.counts.largest_layer)}), "
        f"{method}, {_b(p.trained_params)} trained",
        f"  {inp.nodes} node(s) x {inp.gpus_per_node} GPUs = {inp.gpus} GPUs of {inp.gpu_memory_gib:g} GiB; ZeRO-{z.stage}"
        f"{', offload ' + offload if offload else ''}; {dtype}; attention {inp.attn_implementation}; "
        f"gradient checkpointing {ckpt}",
        f"  micro-batch: {batch} = {inp.tokens} tokens per GPU",
        "",
        f"  {'per GPU, GiB':<62}{'plan':>8}",
        f"  {'parameters         ' + weights + (' shard ' + shard if z.stage == 3 else ''):<62}{p.params_gib:8.2f}",
        f"  {'gradients          shard ' + (shard if z.stage >= 2 else '(replicated)'):<62}{p.grads_gib:8.2f}",
        f"  {'optimizer states   fp32 master + Adam m, v, shard ' + (shard if z.stage >= 1 else ''):<62}"
        f"{p.optimizer_gib:8.2f}",
    ]
    if z.stage == 3:
        lines.append(f"  {'ZeRO-3 working set gathered largest module + its gradient (bwd)':<62}{p.working_set_gib:8.2f}")
    step_what = "fp32 grads of one sub-group" if z.stage == 3 else "fp32 grads of the shard"
    lines.append(f"  {'optimizer step     ' + step_what + ' (step only)':<62}{p.step_grads_gib:8.2f}")
    ds = p.deepspeed_estimate
    ds_txt = ""
    if ds is not None:
        ratio = p.deepspeed_ratio
        ds_txt = f"   DeepSpeed {ds.gpu_gib:.2f}" + (f", ratio {ratio:.2f}" if ratio is not None else
                                                    " (assumes all params trained: not comparable for LoRA)")
    lines += [
        f"  {'= model states, peak (max of working set and step)':<62}{p.model_states_gib:8.2f}{ds_txt}",
        f"  {'activations        with gradient checkpointing':<62}{p.activations_checkpointed_gib:8.2f}"
        + ("   <- used" if inp.gradient_checkpointing else ""),
        f"  {'                   without gradient checkpointing':<62}{p.activations_full_gib:8.2f}"
        + ("" if inp.gradient_checkpointing else "   <- used"),
        f"  {'buffers            CUDA/NCCL, comm buckets, fragmentation':<62}{p.buffers_gib:8.2f}",
        f"  {'TOTAL (peak)':<62}{p.total_gib:8.2f}   of {inp.gpu_memory_gib:g} -> "
        + ("FITS" if p.fits else "DOES NOT FIT"),
    ]
    if p.cpu_gib_per_node:
        cpu_ds = f" (DeepSpeed: {ds.cpu_gib:.0f} GiB)" if ds is not None else ""
        lines.append(f"  host RAM per node for offloaded states: {p.cpu_gib_per_node:.0f} GiB{cpu_ds}")
    lines += ["", "Notes:"]
    if ds is not None:
        lines.append(f"  - DeepSpeed's {ds.function}(total_params={ds.total_params}, largest_layer_params="
                     f"{ds.largest_layer_params}, {inp.gpus_per_node}, {inp.nodes}) covers model states only;")
        if z.stage == 3:
            lines.append("    it counts 18 bytes per parameter shard (fp32 gradients for the whole shard) + 4 x largest "
                         "layer; this plan bf16 gradient shards, then fp32 gradients of one optimizer sub-group.")
        else:
            lines.append("    it counts 2 bytes per parameter (replicated weights) + 18 bytes per parameter shard.")
        lines.append("    Activations, communication buckets, CUDA/NCCL context and fragmentation are not in it.")
    if inp.attn_implementation == "flash_attention_2" and s.softcap:
        lines.append("  - assumes flash-attention 2 (flash-attn >= 2.6 on Ampere+, for soft-capping); without it Gemma2 "
                     "runs eager attention, whose score matrices are quadratic in length (plan that with "
                     "model.attn_implementation=eager).")
    elif inp.attn_implementation == "flash_attention_2":
        lines.append("  - assumes flash-attention 2 (the flash-attn extra on Ampere+); without it transformers uses "
                     "SDPA, also linear in length (plan it with model.attn_implementation=sdpa).")
    if inp.lora_enabled:
        lines.append("  - LoRA activations use the full fine-tuning formula (an upper bound).")
    if p.advice:
        lines += ["", "Does not fit. Change one of:"] + [f"  - {a}" for a in p.advice]
    return "\n".join(lines)
