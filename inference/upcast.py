"""Re-run rows whose fp16 logits overflowed, in fp32, on a model whose weights stay fp16 (or quantized).

Gemma-family models are known to overflow in fp16 (activations beyond 65504 become inf, then NaN). Casting the
whole model to fp32 would need twice its memory (37 GB for a 9B model: not on a 16 GB T4), so each leaf module's
half-precision weights are upcast just before it runs and restored right after: the activations flow in fp32 and
the extra memory is one module's weights. bitsandbytes 4-bit layers compute in fp32 by switching their
compute_dtype; 8-bit layers follow their input's dtype.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

HALF = (torch.float16, torch.bfloat16)


def _to_fp32(x):
    if isinstance(x, torch.Tensor) and x.dtype in HALF:
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    return x


@contextmanager
def fp32_compute(model: nn.Module):
    """Inside: model(...) computes in fp32; outside, every weight is back in its own dtype (bit for bit)."""
    handles, saved = [], {}

    def pre(module, args, kwargs):
        kept = []
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t.dtype in HALF:
                kept.append((t, t.data))
                t.data = t.data.float()
        if hasattr(module, "compute_dtype") and module.compute_dtype in HALF:  # bitsandbytes Linear4bit
            kept.append((module, module.compute_dtype))
            module.compute_dtype = torch.float32
        saved[id(module)] = kept
        return _to_fp32(args), _to_fp32(kwargs)

    def post(module, args, kwargs, output):
        _restore(saved.pop(id(module), []))
        return output

    for m in model.modules():
        # leaf modules hold the weights and do the arithmetic; a few containers hold weights of their own
        if next(m.children(), None) is None or next(m.parameters(recurse=False), None) is not None:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for kept in saved.values():  # a forward that raised: restore what its modules upcast
            _restore(kept)
        saved.clear()


def _restore(kept) -> None:
    for owner, old in kept:
        if isinstance(owner, torch.Tensor):
            owner.data = old
        else:
            owner.compute_dtype = old


def runs_in_half(model: nn.Module) -> bool:
    return any(p.dtype in HALF for p in model.parameters())
