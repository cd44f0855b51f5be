"""Load an exported model for serving: device, dtype, 8-bit/4-bit quantization, adapter base resolution.

The T4 facts behind the choices: compute capability 7.5, so fp16 (bf16 is emulated and slow, flash-attention 2 needs
Ampere); 16 GB, so a 9B model in fp16 (~18 GB) does not fit and is loaded with bitsandbytes in 8-bit (~10 GB) or
4-bit NF4 with fp16 compute (~6 GB).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.modeling import HEAD_FILE, HeadConfig, read_meta

QUANTIZE = ("none", "8bit", "4bit")
DTYPES = ("auto", "fp16", "bf16", "fp32")


class ModelError(ValueError):
    """An exported model directory cannot be used (names the directory and what is wrong)."""


@dataclass(frozen=True)
class LoadSpec:
    """Everything a worker needs to load one model (plain data: it is sent to worker processes)."""

    model_dir: str
    base_model: str | None  # resolved base directory for adapter exports, else None
    quantize: str = "none"
    dtype: str = "auto"
    attn_implementation: str | None = None


def resolve_base_model(model_dir: str | Path, meta: dict[str, Any], override: str | None = None) -> str | None:
    """The base-model directory of an adapter export: `override`, else arena.json's path, else `<model_dir>/base`.

    Returns None for full-weight exports. Raises ModelError listing every place looked at.
    """
    if not meta.get("adapter"):
        return None
    candidates = [override] if override else []
    if meta.get("base_model"):
        candidates.append(meta["base_model"])
    candidates.append(str(Path(model_dir) / "base"))
    for c in candidates:
        if c and (Path(c) / "config.json").exists():
            return str(c)
    raise ModelError(f"{model_dir}: adapter export but no base model found (looked in {candidates}); "
                     f"attach the base model and pass --base-model DIR")


def check_export(model_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check an export directory without loading weights. Returns its arena.json meta."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: model directory not found")
    try:
        meta = read_meta(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ModelError(f"{model_dir}: {e}") from None
    for key in ("format", "head"):
        if key not in meta:
            raise ModelError(f"{model_dir}/arena.json: key {key!r} is missing")
    if not (model_dir / HEAD_FILE).exists():
        raise ModelError(f"{model_dir}: {HEAD_FILE} is missing")
    try:
        HeadConfig(**meta["head"])
    except (TypeError, ValueError) as e:
        raise ModelError(f"{model_dir}/arena.json: bad 'head' entry ({e})") from None
    if not meta.get("adapter"):  # adapter exports take config and weights from their base (checked when resolved)
        if not (model_dir / "config.json").exists():
            raise ModelError(f"{model_dir}: config.json is missing")
        if not any(p.name != HEAD_FILE for p in model_dir.glob("*.safetensors")):
            raise ModelError(f"{model_dir}: no backbone weights (*.safetensors) found")
    t = meta.get("temperature", 1.0) or 1.0
    if not (isinstance(t, (int, float)) and t > 0):
        raise ModelError(f"{model_dir}/arena.json: temperature must be a positive number, got {t!r}")
    return meta


def has_native_bf16(device) -> bool:
    """bf16 in hardware: CUDA compute capability >= 8 (Ampere+). torch.cuda.is_bf16_supported() also counts
    emulation, so it says True on a T4 or V100, where bf16 is slow."""
    import torch

    return str(device).startswith("cuda") and torch.cuda.get_device_capability(device)[0] >= 8


def torch_dtype(name: str, device: str):
    """The compute dtype: 'auto' is fp16 on CUDA and fp32 on the CPU. bf16 on a pre-Ampere GPU is refused."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name == "auto":
        name = "fp16" if device.startswith("cuda") else "fp32"
    if name == "bf16" and device.startswith("cuda") and not has_native_bf16(device):
        raise ValueError(f"{device} has no native bf16 (compute capability < 8, e.g. a T4): use --dtype fp16")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def quantization_config(quantize: str, compute_dtype):
    """A BitsAndBytesConfig for '8bit' / '4bit' (NF4, double quantization), None for 'none'."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    if quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(f"--quantize {quantize} needs bitsandbytes: pip install 'arena-pref[gpu]' "
                          f"(or attach its wheel to the Kaggle wheelhouse)") from None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def placement_kwargs(device: str, quantization=None) -> dict[str, Any]:
    """from_pretrained arguments that put the weights straight on the worker's device: without a device_map
    transformers builds the whole model in host RAM first (two workers x 18.5 GB for a 9B model in fp16), and
    bitsandbytes quantizes at load time on the device it is given."""
    kwargs: dict[str, Any] = {"device_map": {"": device}}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    return kwargs


def load_model(spec: LoadSpec, device: str):
    """(ArenaClassifier in eval mode on `device`, meta). LoRA adapters are merged unless the base is quantized."""
    from inference.modeling import load_pretrained

    dtype = torch_dtype(spec.dtype, device)
    qc = quantization_config(spec.quantize, dtype)
    model, meta = load_pretrained(spec.model_dir, dtype=dtype, device=device,
                                  attn_implementation=spec.attn_implementation, base_model=spec.base_model,
                                  **placement_kwargs(device, qc))
    if meta.get("adapter") and qc is None and hasattr(model.backbone, "merge_and_unload"):
        model.backbone = model.backbone.merge_and_unload()  # one matmul per layer instead of base + LoRA path
    return model.eval(), meta
