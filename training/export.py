"""Export the trained classifier as an inference directory (inference.modeling format), gathering ZeRO-3 shards.

Parameters are gathered one at a time onto rank 0's CPU (never the whole model on one GPU). LoRA is either merged
into the base weights (W + B A * alpha / r) or kept as a peft adapter next to a pointer to the base weights.
The result loads with inference.modeling.load_pretrained, which never imports training/.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from inference.modeling import ArenaClassifier, meta_for, save_head, save_meta, save_pretrained

from .checkpoint import replace_dir
from .config import RunConfig
from .distributed import Dist
from .model import gathered

log = logging.getLogger(__name__)


def gathered_state_dict(model: torch.nn.Module, dist: Dist) -> dict[str, torch.Tensor] | None:
    """The full state dict (CPU copies in the training dtype) on rank 0, None elsewhere. Collective under ZeRO-3."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        with gathered([p]):
            if dist.is_main:
                out[name] = p.detach().cpu().clone()
    if not dist.is_main:
        return None
    params = set(out)
    for name, b in model.state_dict().items():  # persistent buffers (never partitioned)
        if name not in params:
            out[name] = b.detach().cpu().clone()
    return dequantize_4bit_weights(model, out)


def dequantize_4bit_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """QLoRA: replace packed NF4 weights (and their quant-state entries) by dequantized ones, so that LoRA can be
    merged and the export loads as an ordinary model. A no-op for models without bitsandbytes 4-bit layers."""
    # bitsandbytes' own class (peft's LoRA wrapper around it has the same class name)
    quantized = [(n, m) for n, m in model.named_modules()
                 if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")]
    if not quantized:
        return state
    import bitsandbytes.functional as bnbf

    for name, m in quantized:
        key = f"{name}.weight"
        for k in [k for k in state if k.startswith(key + ".")]:
            del state[k]  # absmax, quant_map, ... of the packed weight
        w = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
        state[key] = w.to("cpu", m.weight.quant_state.dtype).clone()
    return state


def merge_lora(state: dict[str, torch.Tensor], scaling: float, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """A plain backbone state dict from a peft LoRA one: W + (B @ A) * scaling, peft's key prefixes removed."""
    peft_prefix = prefix + "base_model.model."
    out = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key or ".lora_dropout" in key:
            continue
        if key.startswith(peft_prefix):
            name = prefix + key[len(peft_prefix):]
        else:
            name = key
        if ".base_layer." in name:
            module = key[: key.index(".base_layer.")]
            a = [v for k, v in state.items() if k.startswith(module + ".lora_A.") and k.endswith(".weight")]
            b = [v for k, v in state.items() if k.startswith(module + ".lora_B.") and k.endswith(".weight")]
            if name.endswith(".base_layer.weight") and a and b:
                value = (value.float() + (b[0].float() @ a[0].float()) * scaling).to(value.dtype)
            name = name.replace(".base_layer.", ".")
        out[name] = value
    return out


def export_model(model: ArenaClassifier, cfg: RunConfig, tokenizer, dist: Dist, out_dir: Path, **meta: Any) -> Path:
    """Write `out_dir` atomically (tmp dir then rename) on rank 0. Collective: every rank must call it."""
    state = gathered_state_dict(model, dist)
    out_dir = Path(out_dir)
    if dist.is_main:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        fmt = cfg.data.format.to_dict()
        if not cfg.lora.enabled:
            save_pretrained(model, tokenizer, tmp, fmt, state_dict=state, **meta)
        elif cfg.lora.merge_on_export:
            merged = merge_lora(state, cfg.lora.alpha / cfg.lora.r)
            save_pretrained(_PlainView(model), tokenizer, tmp, fmt, state_dict=merged, **meta)
        else:
            _save_adapter(model, cfg, tokenizer, tmp, out_dir, state, fmt, meta)
        replace_dir(tmp, out_dir)  # a crash mid-way never loses the previous export
    dist.barrier()
    return out_dir


class _PlainView:
    """What save_pretrained needs of a LoRA model whose weights were merged: the unwrapped HF backbone."""

    def __init__(self, model: ArenaClassifier):
        base = model.backbone.get_base_model()
        self.backbone = _DequantizedBackbone(base) if getattr(base, "hf_quantizer", None) else base
        self.head_cfg, self.pooling, self.head = model.head_cfg, model.pooling, model.head


class _DequantizedBackbone:
    """Writes a QLoRA backbone as an ordinary one. transformers' save_pretrained of a quantized model ignores the
    state_dict it is given and saves the packed 4-bit weights, so config and safetensors are written here."""

    def __init__(self, base):
        import copy

        self.config = copy.deepcopy(base.config)
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(self.config, attr):
                delattr(self.config, attr)

    def save_pretrained(self, out: str, state_dict: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.config.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(Path(out) / "model.safetensors"),
                  metadata={"format": "pt"})


def _save_adapter(model, cfg: RunConfig, tokenizer, tmp: Path, out_dir: Path, state: dict, fmt: dict, meta: dict):
    """final/adapter (peft) + head + meta; the base weights are model.name_or_path, or for a model built from config
    (no weights on disk) they are written to `base/` inside the export."""
    tmp.mkdir(parents=True)
    backbone_sd = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    model.backbone.save_pretrained(str(tmp / "adapter"), state_dict=backbone_sd)
    if cfg.model.name_or_path:
        base = str(Path(cfg.model.name_or_path).resolve()) if Path(cfg.model.name_or_path).exists() else cfg.model.name_or_path
    else:
        plain = merge_lora(state, 0.0)  # scaling 0: the unchanged base weights
        base_sd = {k[len("backbone."):]: v for k, v in plain.items() if k.startswith("backbone.")}
        model.backbone.get_base_model().save_pretrained(str(tmp / "base"), state_dict=base_sd)
        base = str((out_dir / "base").resolve())
    save_head(model, tmp, {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    save_meta(tmp, meta_for(model, fmt, **{**meta, "adapter": True, "base_model": base}))
