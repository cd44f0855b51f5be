"""Build the classifier that is trained: backbone (pretrained, or tiny from config), optional LoRA/QLoRA, the head.

Under ZeRO-3 the parameters are partitioned from the moment they are created (HfDeepSpeedConfig must exist before
the backbone is built, and the head is created inside deepspeed.zero.Init), so even a 9B model never sits whole on
one GPU. The head is then initialised explicitly with its parameters gathered to rank 0 and broadcast.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext

import torch

from inference.loading import has_native_bf16, placement_kwargs
from inference.modeling import ArenaClassifier, default_attn_implementation, drop_unused_pooler

from .config import ConfigError, RunConfig, model_type_of, pretrained_source

log = logging.getLogger(__name__)


def train_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """The one place that decides the training dtype (the DeepSpeed config and zero.Init follow it): bf16 on GPUs
    with native bf16, fp32 elsewhere (CPU bf16 matmuls are slow and exact-resume tests need fp32)."""
    native = has_native_bf16(device)
    if cfg.model.dtype == "auto":
        if device.type == "cuda" and not native:
            # pre-Ampere (T4, V100): bf16 is only emulated (torch.cuda.is_bf16_supported() still says True);
            # fp32 is slow but exact, and says so
            log.warning("%s has no native bf16: training in float32 (use an Ampere+ GPU for bf16)", device)
            return torch.float32
        return torch.bfloat16 if native else torch.float32
    if cfg.model.dtype == "bfloat16" and device.type == "cpu":
        raise ValueError("model.dtype=bfloat16 is not supported for CPU training; use auto or float32")
    if cfg.model.dtype == "bfloat16" and not native:
        raise ValueError(f"model.dtype=bfloat16: {device} has no native bf16 (compute capability < 8, e.g. T4 or "
                         "V100); use auto (float32 there) or an Ampere+ GPU")
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.model.dtype]


def hf_config(cfg: RunConfig, tokenizer):
    """The backbone's HF config (tiny: built from model.tiny with the tokenizer's vocabulary)."""
    from transformers import AutoConfig

    if cfg.model.tiny:
        kw = dict(cfg.model.tiny)
        model_type = kw.pop("model_type")
        special = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **{**special, **kw})
    if cfg.model.init_from:
        hf_cfg = AutoConfig.from_pretrained(cfg.model.init_from, local_files_only=True)
        vocab = getattr(hf_cfg, "vocab_size", None) or hf_cfg.get_text_config().vocab_size
        if len(tokenizer) > vocab:  # ids beyond the embedding table would fail (or read garbage) mid-run
            raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens, but the embeddings of model.init_from="
                              f"{cfg.model.init_from} hold {vocab}; use the export's tokenizer (data.tokenizer=null)")
        return hf_cfg
    return AutoConfig.from_pretrained(cfg.model.name_or_path)


def hidden_size(hf_cfg) -> int:
    return getattr(hf_cfg, "hidden_size", None) or hf_cfg.get_text_config().hidden_size


def attn_implementation(cfg: RunConfig, device: torch.device) -> str | None:
    """The configured attention, else eager for Gemma2 / flash-attention 2 on Ampere+; None lets transformers pick
    (sdpa where the architecture supports it, eager otherwise, e.g. DeBERTa-v2)."""
    if cfg.model.attn_implementation:
        return cfg.model.attn_implementation
    if cfg.data.packing:
        from data.packing import packed_attn_implementation

        # flash-attention varlen on Ampere+, else the exact CPU varlen twin: masked attention would compute all
        # T^2 scores of a packed row (measured: no speedup from packing on the CPU with sdpa)
        return packed_attn_implementation(model_type_of(cfg) or "", device.type)
    choice = default_attn_implementation(model_type_of(cfg) or "", device.type)
    return None if choice == "sdpa" else choice


def attn_implementation_of(model) -> str:
    """The attention the built backbone actually uses."""
    return getattr(model.config, "_attn_implementation", None) or "eager"


def build_backbone(cfg: RunConfig, hf_cfg, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModel

    attn = attn_implementation(cfg, device)
    if attn == "arena_varlen":  # a custom attention: transformers only knows it once registered
        from data.packing import register_varlen_attention

        register_varlen_attention()
    if cfg.model.tiny:
        backbone = AutoModel.from_config(hf_cfg, attn_implementation=attn, dtype=dtype)
    else:
        # an init_from export is an HF model directory: local safetensors only
        local = {"local_files_only": True, "use_safetensors": True} if cfg.model.init_from else {}
        backbone = AutoModel.from_pretrained(pretrained_source(cfg), dtype=dtype, attn_implementation=attn,
                                             **local, **pretrained_placement(cfg, dtype, device))
    # the pooled token only needs the backbone's hidden states: no KV cache while training (also keeps packed
    # position_ids detectable, see inference.modeling)
    backbone.config.use_cache = False
    drop_unused_pooler(backbone)
    if cfg.model.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads, and with ZeRO-3 hooks
        kwargs = {"use_reentrant": False}
        if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return backbone


def pretrained_placement(cfg: RunConfig, dtype: torch.dtype, device: torch.device) -> dict:
    """Where from_pretrained puts the weights. ZeRO-3: nowhere in particular (HfDeepSpeedConfig partitions them as
    they load; a device_map would fight it). Otherwise straight onto this rank's device: without a device_map each
    of a node's 8 ranks would first build the whole model in host RAM (8 x 18.5 GB for Gemma2-9B in bf16)."""
    if cfg.deepspeed.zero_stage == 3 and not cfg.lora.qlora:
        return {}
    return placement_kwargs(str(device), _bnb_4bit(dtype) if cfg.lora.qlora else None)


def _bnb_4bit(dtype: torch.dtype):
    """QLoRA's base: NF4 with double quantization, the same config inference loads 4-bit models with."""
    from inference.loading import quantization_config

    try:
        return quantization_config("4bit", dtype)
    except ImportError:
        raise ImportError("lora.qlora needs bitsandbytes: pip install 'arena-pref[gpu]'") from None


def add_lora(cfg: RunConfig, backbone, dtype: torch.dtype | None = None):
    """The backbone wrapped with LoRA adapters (cfg.lora), their parameters in the training `dtype`.

    peft upcasts adapters of a bf16/fp16 model to fp32 (autocast_adapter_dtype); DeepSpeed's bf16 engine needs one
    dtype for every trainable parameter (it keeps the fp32 master copy itself), so they are cast back. Found on a
    GPU: CPU training is fp32, where the two agree."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lo = cfg.lora
    if lo.qlora:
        backbone = prepare_model_for_kbit_training(
            backbone, use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_cfg = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules),
                          bias="none")
    names = linear_module_names(backbone)
    if "all-linear" not in lo.target_modules and not set(lo.target_modules) & set(names):
        # module names differ per architecture: q_proj/k_proj/v_proj/o_proj (Llama, Gemma2), query/key/value/dense
        # (BERT), query_proj/key_proj/value_proj (DeBERTa-v2)
        from .config import ConfigError

        raise ConfigError(f"lora.target_modules={list(lo.target_modules)} matches no module of this "
                          f"{backbone.config.model_type} model; its linear modules are: {', '.join(names)}")
    try:
        model = get_peft_model(backbone, peft_cfg)
    except ValueError as e:  # e.g. target modules not found in the model
        raise ValueError(f"lora.target_modules={list(lo.target_modules)}: {e}") from None
    if dtype is not None:
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def linear_module_names(model) -> list[str]:
    """The distinct last names of the model's linear layers (what lora.target_modules matches)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in out:
                out.append(leaf)
    return out


def build_model(cfg: RunConfig, tokenizer, hf_cfg, ds_config: dict, device: torch.device) -> ArenaClassifier:
    """The ArenaClassifier to train (parameters partitioned when ZeRO stage is 3; head explicitly initialised)."""
    dtype = train_dtype(cfg, device)
    stage3 = cfg.deepspeed.zero_stage == 3
    backbone = build_backbone(cfg, hf_cfg, dtype, device)
    if cfg.lora.enabled:
        backbone = add_lora(cfg, backbone, dtype)
    if cfg.lora.qlora and device.type == "cpu":
        for m in backbone.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                # bitsandbytes repacks 4-bit weights for bf16 AVX512 kernels in eval mode on CPU: evaluation would
                # then run in bf16 and the export (dequantized from a lossy inverse) would not match it
                m.support_avx512bf16_for_cpu = False
    if stage3:
        import deepspeed

        # No dtype= here: zero.Init then takes the dtype from ds_config's bf16/fp16 flags, which deepspeed_config
        # derived from train_dtype (the one place that decides). DeepSpeed 0.19.8 ignores an explicit dtype= on
        # accelerators without fp16 (a CPU whose oneDNN lacks it) and uses bf16, mixing dtypes with the backbone;
        # check_param_dtypes below names any parameter that still ends up in another dtype.
        init_ctx = deepspeed.zero.Init(config_dict_or_path=ds_config)
    else:
        init_ctx = nullcontext()
    with init_ctx:  # the head is created partitioned too
        model = ArenaClassifier(backbone, cfg.model.head)
    if not stage3:
        model.head.to(dtype=dtype)
    with gathered(list(model.head.parameters()), modifier_rank=0):
        # rank 0's values are broadcast when the context exits, so every rank starts from the same head
        if cfg.model.init_from and cfg.model.init_head == "keep":
            from .init_from import load_head

            load_head(model, cfg.model.init_from)  # shapes checked at config validation (init_from.check_source)
        else:
            model.reset_head()
    check_param_dtypes(model, dtype, skip_quantized=cfg.lora.qlora)
    return model


def check_param_dtypes(model, dtype: torch.dtype, skip_quantized: bool = False) -> None:
    """Every floating parameter in the training dtype: a mixed model fails later, deep inside deepspeed.initialize
    (an AssertionError in defragment), so fail here with the parameters' names."""
    wrong = {}
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.dtype == dtype:
            continue
        if skip_quantized and not p.requires_grad:  # QLoRA: the frozen base is stored quantized / in compute dtype
            continue
        wrong.setdefault(str(p.dtype), []).append(name)
    if wrong:
        listed = "; ".join(f"{d}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})"
                           for d, names in wrong.items())
        raise RuntimeError(f"parameters are not in the training dtype {dtype}: {listed}")


def gathered(params, modifier_rank=None):
    """deepspeed.zero.GatheredParameters for ZeRO-3 parameters, a no-op context for ordinary ones."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def param_groups(cfg: RunConfig, model: ArenaClassifier) -> list[dict]:
    """AdamW groups: weight decay only on matrices (not biases / norm weights); the head may have its own lr."""
    t = cfg.train
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 parameters are empty locally; ds_shape is the real one
        key = (name.startswith("head."), len(shape) >= 2)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_head, decay), params in sorted(groups.items()):
        lr = (t.head_lr or t.lr) if is_head else t.lr
        out.append({"params": params, "lr": lr, "weight_decay": t.weight_decay if decay else 0.0})
    return out


def make_optimizer(cfg: RunConfig, model: ArenaClassifier):
    """torch AdamW, or DeepSpeed's CPU Adam when the optimizer is offloaded (ZeRO-Offload requires it)."""
    t = cfg.train
    groups = param_groups(cfg, model)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update at 0-based optimizer step `step`: linear warmup, cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(cfg: RunConfig, optimizer, total_steps: int):
    t = cfg.train
    warmup = t.warmup_steps or int(round(t.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps, t.min_lr_ratio))


def count_params(model) -> dict:
    """Full and local (this rank's partition) element counts, trainable elements (evidence of ZeRO-3 sharding) and
    the parameters' dtypes."""
    full = local = trainable = 0
    dtypes = set()
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        full += n
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        trainable += n if p.requires_grad else 0
        dtypes.add(str(p.dtype).removeprefix("torch."))
    return {"full_numel": full, "local_numel": local, "trainable_numel": trainable, "dtypes": sorted(dtypes)}
