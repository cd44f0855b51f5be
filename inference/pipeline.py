"""`--parallel pipeline`: one model split by layers over several devices, micro-batches flowing through the stages.

Why: Gemma2-9B in fp16 is ~18.5 GB and a Kaggle T4 has 16 GB. Data-parallel serving must quantize it (4-bit costs
accuracy and speed); split by layers over the two T4s it runs in fp16 with no quantization loss.

How it fits the rest: a pipeline group of stage processes looks like ONE worker to the dispatch loop
(predict._Loop): stage 0 reads the group's inbox (the same messages a worker gets), pads each batch, cuts it into
micro-batches and runs embeddings + its layers; hidden states travel to the next stage over a multiprocessing queue
(CPU tensors: shared memory on the CPU, one device->host->device copy per micro-batch on GPUs, ~60 MB for a full
Gemma2-9B batch, milliseconds over PCIe next to seconds of compute); the last stage applies final norm, pooling and
the head and puts the logits in the shared outbox. Budget, checkpointing, TTA and ordering are therefore unchanged.

Schedule: stage 0 never waits for the next stage (queue puts are asynchronous) and the loop keeps `depth` batches
queued, so stage 1 works on micro-batch j while stage 0 runs micro-batch j+1, and on batch b while stage 0 starts
batch b+1. The pipeline bubble (one stage idle) is one micro-batch at the start and one at the end of the run (and
after each model switch), not per batch as in GPipe's flush-per-step training.

Weights: each stage reads only its own tensors from the export's safetensors (the whole fp16 model never sits in one
process); layers are split so that every stage holds about the same parameter bytes (embeddings on stage 0, final
norm and head on the last).

Faults: any stage process dying kills the group (pool.newly_dead reports it once); the surviving stages are stopped
and, when a data-parallel copy fits the devices (quantized with --fallback-quantize on GPUs, the same weights on the
CPU), one worker per device takes over the remaining rows; else no worker is left and they get the prior. Each stage
halves its micro-batch on out-of-memory like worker.Runner, and re-runs rows whose half-precision output is not
finite through its own layers in fp32 compute (inference.upcast), passing fp32 hidden states on for those rows.

Debug switch (tests): ARENA_DEBUG_STAGE_EXIT_AFTER=1:2 makes stage 1 call os._exit(3) after finishing 2 batches;
ARENA_DEBUG_SLEEP_PER_BATCH and ARENA_DEBUG_OOM_ABOVE apply per stage as in worker.py.
"""
from __future__ import annotations

import json
import os
import queue
import struct
import time
import traceback
import warnings
from functools import partial
from pathlib import Path

import numpy as np

DECODERS_MSG = "--parallel pipeline supports decoder models (llama, gemma2, ...)"
# 16-bit weight bytes times this is what a data-parallel fallback copy needs (bitsandbytes packing, scales,
# fp16 embeddings/norms kept) plus activations; measured shapes of 4-bit NF4 / 8-bit loads of 8-9B models.
FALLBACK_FACTOR = {"4bit": 0.40, "8bit": 0.65, "none": 1.0}
FALLBACK_OVERHEAD = 2 * 1024**3  # CUDA context, activations of a batch, allocator slack


# -- the split (pure) ---------------------------------------------------------------------------------------------
def split_layers(param_bytes_per_layer, n_stages: int, first_extra: int = 0, last_extra: int = 0) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges, one per stage, minimising the heaviest stage's bytes.

    `first_extra` (embeddings) counts on stage 0 and `last_extra` (final norm + head) on the last stage. Exact
    (dynamic programming over cut points, O(stages x layers^2)): models have at most ~100 layers. Raises ValueError
    when there are fewer layers than stages.
    """
    w = [int(b) for b in param_bytes_per_layer]
    n = len(w)
    if n_stages < 1:
        raise ValueError(f"need at least one stage, got {n_stages}")
    if n < n_stages:
        raise ValueError(f"{n} layers cannot be split over {n_stages} stages")
    prefix = np.concatenate([[0], np.cumsum(w)]).tolist()

    def load(s: int, a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (first_extra if s == 0 else 0) + (last_extra if s == n_stages - 1 else 0)

    # best[s][e]: (heaviest stage, cuts) for layers [0, e) over stages 0..s
    best = [{e: (load(0, 0, e), [0, e]) for e in range(1, n - n_stages + 2)}]
    for s in range(1, n_stages):
        row = {}
        for e in range(s + 1, n - (n_stages - 1 - s) + 1):
            row[e] = min(((max(best[-1][c][0], load(s, c, e)), best[-1][c][1] + [e])
                          for c in range(s, e) if c in best[-1]), key=lambda t: (t[0], t[1]))
        best.append(row)
    cuts = best[-1][n][1]
    return [(cuts[i], cuts[i + 1]) for i in range(n_stages)]


def safetensors_sizes(path: str | Path) -> dict[str, int]:
    """Bytes of every tensor in a .safetensors file, from its JSON header alone (no weights read)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def weight_files(model_dir: str | Path) -> list[Path]:
    from inference.modeling import HEAD_FILE

    return sorted(p for p in Path(model_dir).glob("*.safetensors") if p.name != HEAD_FILE)


def layer_of(key: str) -> int | None:
    """Decoder layer index of a backbone weight name ('layers.3.mlp.up_proj.weight' -> 3), else None."""
    parts = key.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def stage_bytes(sizes: dict[str, int], n_layers: int) -> tuple[list[int], int, int]:
    """(bytes per decoder layer, bytes before the layers (embeddings), bytes after (final norm))."""
    per_layer = [0] * n_layers
    first = last = 0
    for key, b in sizes.items():
        i = layer_of(key)
        if i is not None and i < n_layers:
            per_layer[i] += b
        elif "embed" in key:
            first += b
        else:
            last += b
    return per_layer, first, last


def plan_stages(model_dir: str | Path, n_stages: int) -> list[tuple[int, int]]:
    """The layer ranges of an export for `n_stages` stages (reads config.json and safetensors headers only)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    n_layers = int(cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers"))
    sizes: dict[str, int] = {}
    for f in weight_files(model_dir):
        sizes.update(safetensors_sizes(f))
    per_layer, first, last = stage_bytes(sizes, n_layers)
    hidden = int(cfg.get("hidden_size") or 0)
    return split_layers(per_layer, n_stages, first, last + 4 * 3 * hidden)  # + fp32 head on the last stage


def model_bytes_16bit(model_dir: str | Path) -> int:
    """Weight bytes of the export at 2 bytes per parameter (what fp16 serving holds)."""
    from safetensors import safe_open

    total = 0
    for f in weight_files(model_dir):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                total += 2 * int(np.prod(h.get_slice(k).get_shape()))
    return total


def fallback_fits(model_bytes: int, quantize: str, device_bytes: int | None) -> bool:
    """Whether one data-parallel copy (quantized as given) fits a device of `device_bytes` (None: host RAM, yes)."""
    if device_bytes is None:
        return True
    return model_bytes * FALLBACK_FACTOR[quantize] + FALLBACK_OVERHEAD <= device_bytes


def check_pipeline(model_dir: str, meta: dict, n_devices: int, quantize: str) -> None:
    """Refuse what the pipeline cannot serve, before any process starts (ValueError, exit status 2)."""
    from inference.modeling import ENCODER_TYPES

    if n_devices < 2:
        raise ValueError(f"--parallel pipeline needs at least 2 devices (got {n_devices}): "
                         "use --devices cuda:0,cuda:1 or cpu:2")
    if quantize != "none":
        raise ValueError("--parallel pipeline serves the model unquantized (that is its point); "
                         "drop --quantize or use --parallel data")
    if meta.get("adapter"):
        raise ValueError(f"{model_dir}: --parallel pipeline needs a full-weight export (this is a LoRA adapter "
                         "export; export it merged, or use --parallel data)")
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("model_type") in ENCODER_TYPES or "num_hidden_layers" not in cfg:
        raise ValueError(f"{DECODERS_MSG}; {model_dir} is a {cfg.get('model_type')!r} model")
    if cfg["num_hidden_layers"] < n_devices:
        raise ValueError(f"{model_dir}: {cfg['num_hidden_layers']} layers cannot be split over {n_devices} devices")


# -- a stage (torch) ----------------------------------------------------------------------------------------------
def _torch_stage_class():
    import torch
    from torch import nn

    class Stage(nn.Module):
        """Layers [start, end) of a decoder backbone; stage 0 also embeds, the last also norms, pools and classifies.

        Builds what the backbone's own forward builds (transformers 5 Llama/Gemma2): position ids 0..T-1, rotary
        (cos, sin), and the causal + padding mask per layer type (Gemma2 alternates sliding-window layers).
        """

        def __init__(self, config, start, end, layers, rotary, embed=None, norm=None, head=None, pooling="last"):
            super().__init__()
            self.config, self.start, self.end = config, start, end
            self.layers = nn.ModuleList(layers)
            self.rotary = rotary
            self.embed, self.norm, self.head = embed, norm, head
            self.pooling = pooling

        @property
        def first(self) -> bool:
            return self.embed is not None

        @property
        def last(self) -> bool:
            return self.head is not None

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            """x: token ids (B, T) on stage 0, else hidden states (B, T, H); returns hidden states, or logits (B, 3)
            on the last stage."""
            from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

            from inference.modeling import ArenaClassifier

            h = self.embed(x) if self.first else x
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            kw = dict(config=self.config, inputs_embeds=h, attention_mask=attention_mask, past_key_values=None,
                      position_ids=pos)
            types = getattr(self.config, "layer_types", None) or ["full_attention"] * self.config.num_hidden_layers
            masks = {"full_attention": create_causal_mask(**kw)}
            if "sliding_attention" in types[self.start:self.end]:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
            pe = self.rotary(h, pos)
            for i, layer in zip(range(self.start, self.end), self.layers):
                h = layer(h, attention_mask=masks[types[i]], position_embeddings=pe, position_ids=pos)
            if not self.last:
                return h
            h = self.norm(h)
            idx = ArenaClassifier.pool_index(self, attention_mask)  # same pooling code as the one-device model
            pooled = h[torch.arange(h.shape[0], device=h.device), idx]
            return self.head(pooled.to(next(self.head.parameters()).dtype))

    return Stage


def split_model(model, bounds: list[tuple[int, int]]) -> list:
    """Stages sharing the modules of a loaded ArenaClassifier (in-process; the tests compare them to the model)."""
    Stage = _torch_stage_class()
    bb = model.backbone
    n = len(bounds)
    return [Stage(bb.config, a, b, list(bb.layers[a:b]), bb.rotary_emb, embed=bb.embed_tokens if s == 0 else None,
                  norm=bb.norm if s == n - 1 else None, head=model.head if s == n - 1 else None, pooling=model.pooling)
            for s, (a, b) in enumerate(bounds)]


def load_stage(spec: dict, device: str, bounds: list[tuple[int, int]], s: int):
    """Stage `s` of an export on `device`, reading only its own tensors from the safetensors files."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from inference.loading import torch_dtype
    from inference.modeling import (HEAD_FILE, build_head, default_attn_implementation, head_config_from_meta,
                                    read_meta, resolve_pooling)

    model_dir = spec["model_dir"]
    dtype = torch_dtype(spec.get("dtype", "auto"), device)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    attn = spec.get("attn_implementation") or default_attn_implementation(config.model_type, device)
    if attn == "flash_attention_2":
        attn = "sdpa"  # the stage builds 4D masks itself; flash-attention 2 wants none
    with torch.device("meta"):
        bb = AutoModel.from_config(config, attn_implementation=attn, dtype=dtype)
    a, b = bounds[s]
    first, last = s == 0, s == len(bounds) - 1
    keep = [f"layers.{i}." for i in range(a, b)] + (["embed_tokens."] if first else []) + (["norm."] if last else [])
    state = {}
    for f in weight_files(model_dir):
        with safe_open(str(f), "pt", device="cpu") as h:
            for k in h.keys():
                if any(k.startswith(p) for p in keep):
                    state[k] = h.get_tensor(k).to(device=device, dtype=dtype)
    parts = {"layers": [bb.layers[i] for i in range(a, b)], "embed": bb.embed_tokens if first else None,
             "norm": bb.norm if last else None}
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList(parts["layers"])
    if first:
        holder.embed_tokens = parts["embed"]
    if last:
        holder.norm = parts["norm"]
    holder.to_empty(device=device)
    remapped = {k.replace(f"layers.{k.split('.')[1]}.", f"layers.{int(k.split('.')[1]) - a}.", 1)
                if k.startswith("layers.") else k: v for k, v in state.items()}
    missing, unexpected = holder.load_state_dict(remapped, strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"{model_dir}: stage {s} weights do not match the config (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    rotary = type(bb.rotary_emb)(config=config).to(device)  # buffers computed, not stored: build them for real
    head = None
    meta = read_meta(model_dir)
    if last:
        head = build_head(config.hidden_size, head_config_from_meta(meta))
        head.load_state_dict(load_file(str(Path(model_dir) / HEAD_FILE)))
        head.to(device=device, dtype=torch.float32)  # fp32 head, as in modeling.load_pretrained
    pooling = resolve_pooling(meta.get("head", {}).get("pooling", "auto"), config.model_type)
    Stage = _torch_stage_class()
    return Stage(config, a, b, list(holder.layers), rotary, embed=parts["embed"], norm=parts["norm"], head=head,
                 pooling=pooling).eval()
