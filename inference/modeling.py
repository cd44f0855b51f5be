"""The preference classifier: a Hugging Face backbone plus a 3-class head, and its export format.

Training imports this module (inference never imports training), so the model that is trained is the model that is
served. An exported directory is a normal HF model directory plus two files:

    config.json, model.safetensors, tokenizer files   backbone (AutoModel.save_pretrained) and its tokenizer
    arena_head.safetensors                            head weights
    arena.json                                        head, pooling, FormatConfig, temperature, class prior
    adapter/ (optional)                               a peft LoRA adapter; then `base_model` in arena.json
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HEAD_FILE = "arena_head.safetensors"
META_FILE = "arena.json"
ENCODER_TYPES = {"bert", "roberta", "deberta", "deberta-v2", "electra", "xlm-roberta", "modernbert", "distilbert"}
EAGER_ONLY = {"gemma2"}  # sdpa cannot apply Gemma2's attention soft-capping: transformers refuses it


@dataclass(frozen=True)
class HeadConfig:
    type: str = "linear"  # "linear" or "mlp"
    mlp_hidden: int = 0  # mlp width; 0 means the backbone's hidden size
    dropout: float = 0.0
    pooling: str = "auto"  # "last" (decoders), "first" (encoders), "auto": chosen from the backbone type
    init_std: float = 0.02

    def __post_init__(self):
        if self.type not in ("linear", "mlp"):
            raise ValueError(f"head.type must be 'linear' or 'mlp', got {self.type!r}")
        if self.pooling not in ("auto", "last", "first"):
            raise ValueError(f"head.pooling must be 'auto', 'last' or 'first', got {self.pooling!r}")


def resolve_pooling(pooling: str, model_type: str) -> str:
    if pooling != "auto":
        return pooling
    return "first" if model_type in ENCODER_TYPES else "last"


def default_attn_implementation(model_type: str, device: str = "cpu") -> str | None:
    """eager for Gemma2 (soft-capping), flash_attention_2 on CUDA when installed, sdpa otherwise; None for encoders
    (transformers picks: DeBERTa-v2 refuses sdpa)."""
    if model_type in ENCODER_TYPES:
        return None
    if model_type in EAGER_ONLY and device == "cpu":
        return "eager"
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            if torch.cuda.get_device_capability()[0] >= 8:  # Ampere+; T4 (7.5) has no flash-attention 2
                return "flash_attention_2"
        except ImportError:
            pass
    return "eager" if model_type in EAGER_ONLY else "sdpa"


def build_head(hidden: int, cfg: HeadConfig) -> nn.Module:
    if cfg.type == "linear":
        return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(hidden, 3))
    width = cfg.mlp_hidden or hidden
    return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, 3))


class ArenaClassifier(nn.Module):
    """Backbone + pooled 3-class head. Logits are ordered (A wins, B wins, tie)."""

    def __init__(self, backbone: nn.Module, head_cfg: HeadConfig = HeadConfig()):
        super().__init__()
        self.backbone = backbone
        self.head_cfg = head_cfg
        config = backbone.config
        self.pooling = resolve_pooling(head_cfg.pooling, getattr(config, "model_type", ""))
        hidden = getattr(config, "hidden_size", None) or config.get_text_config().hidden_size
        self.head = build_head(hidden, head_cfg)

    @property
    def config(self):
        return self.backbone.config

    def reset_head(self) -> None:
        """Explicit init (normal(0, init_std), zero bias). Under ZeRO-3 call it inside GatheredParameters."""
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.head_cfg.init_std)
                nn.init.zeros_(m.bias)

    def pool_index(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Index of the pooled token per row: the last real token (right or left padding) or the first one."""
        seq = attention_mask.shape[1]
        if self.pooling == "first":
            return attention_mask.long().argmax(dim=1)
        positions = torch.arange(seq, device=attention_mask.device).expand_as(attention_mask)
        return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pool_index: torch.Tensor | None = None,
        **backbone_kwargs: Any,
    ) -> torch.Tensor:
        """Logits of shape (examples, 3).

        Padded batch: `input_ids` (B, T) and `attention_mask` (B, T). Packed batch: `input_ids` (1, T), `position_ids`
        (1, T) restarting at 0 for each example, `attention_mask=None`, and `pool_index` (N,) giving each example's
        last-token position (the stock *ForSequenceClassification pooling cannot pool packed rows).
        """
        # use_cache=False: with a cache transformers does not detect packed position_ids (silent cross-attention).
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            **backbone_kwargs,
        )
        hidden = out.last_hidden_state
        if pool_index is not None:
            if hidden.shape[0] != 1:
                raise ValueError("pool_index is for packed batches of one row")
            pooled = hidden[0, pool_index]
        else:
            if attention_mask is None:
                attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
            idx = self.pool_index(attention_mask)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        head_dtype = next(self.head.parameters()).dtype
        return self.head(pooled.to(head_dtype))


def save_meta(out_dir: str | Path, meta: dict[str, Any]) -> None:
    out = Path(out_dir)
    tmp = out / f"{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, out / META_FILE)


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    p = Path(model_dir) / META_FILE
    if not p.exists():
        raise FileNotFoundError(f"{model_dir} is not an exported arena model: {META_FILE} is missing")
    return json.loads(p.read_text())


def save_head(model: ArenaClassifier, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    state = state if state is not None else {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(Path(out_dir) / HEAD_FILE))


def load_head_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The exported head's weights (fp32, safetensors only)."""
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / HEAD_FILE))


def head_config_from_meta(meta: dict[str, Any]) -> HeadConfig:
    return HeadConfig(**meta["head"])


def meta_for(model: ArenaClassifier, format_cfg: dict[str, Any], **extra: Any) -> dict[str, Any]:
    meta = {
        "format_version": 1,
        "head": asdict(model.head_cfg),
        "pooling": model.pooling,
        "format": format_cfg,
        "labels": ["winner_model_a", "winner_model_b", "winner_tie"],
        "temperature": 1.0,
        "prior": None,
        "base_model": None,
        "adapter": False,
    }
    meta.update(extra)
    return meta


def save_pretrained(
    model: ArenaClassifier, tokenizer, out_dir: str | Path, format_cfg: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None, **meta: Any,
) -> Path:
    """Write an exported model directory (see module docstring). `state_dict` (full, gathered, `backbone.*` and
    `head.*` keys) is for models whose parameters are partitioned (ZeRO-3): gather first, then pass it here."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    backbone_sd = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    head_sd = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
    model.backbone.save_pretrained(str(out), state_dict=backbone_sd)
    save_head(model, out, head_sd)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    save_meta(out, meta_for(model, format_cfg, **meta))
    return out


def drop_unused_pooler(backbone: nn.Module) -> None:
    """BERT-style encoders carry a pooler (dense + tanh over [CLS]) that the arena head never reads: in training it
    would get no gradient, sit in the optimizer and be exported as dead weight; at inference it is wasted work."""
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None


def load_pretrained(
    model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
    attn_implementation: str | None = None, base_model: str | Path | None = None, **from_pretrained_kwargs: Any,
) -> tuple[ArenaClassifier, dict[str, Any]]:
    """Load an exported directory (weights via safetensors only, no remote code). Returns (model in eval mode, meta).

    base_model: for adapter exports, a local base-model directory that replaces arena.json's `base_model` (the
    training machine's path rarely exists where the model is served, e.g. on Kaggle).
    """
    from transformers import AutoConfig, AutoModel

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    base = Path(base_model or meta["base_model"]) if meta.get("adapter") else model_dir
    config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    attn = attn_implementation or default_attn_implementation(config.model_type, device)
    backbone = AutoModel.from_pretrained(
        str(base), dtype=dtype, attn_implementation=attn, local_files_only=True, use_safetensors=True,
        **from_pretrained_kwargs,
    )
    drop_unused_pooler(backbone)
    if meta.get("adapter"):
        from peft import PeftModel

        backbone = PeftModel.from_pretrained(backbone, str(model_dir / "adapter"), is_trainable=False)
    model = ArenaClassifier(backbone, head_config_from_meta(meta))
    model.head.load_state_dict(load_head_state(model_dir))
    model.head.to(device=device, dtype=torch.float32)  # the head stays fp32: cheap and keeps log-probs accurate
    if not from_pretrained_kwargs.get("quantization_config") and not from_pretrained_kwargs.get("device_map"):
        model.backbone.to(device)
    return model.eval(), meta
