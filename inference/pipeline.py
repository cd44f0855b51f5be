"""`--parallel pipeline`: one model split by layers over several devices, micro-batches flowing through the stages.

Why: Gemma2-9B in fp16 is ~18.5 GB and a Kaggle T4 has 16 GB. Data-parallel serving must quantize it (4-bit costs
accuracy and speed); split by layers over the two T4s it runs in fp16 with no quantization loss.

How it fits the rest: a pipeline group of stage processes looks like ONE worker to the dispatch loop
(predict._Loop): stage 0 reads the group's inbox (the same messages a worker gets), pads each batch, cuts it into
micro-batches and runs embeddings + its layers; hidden states travel to the next stage over a multiprocessing queue
as numpy arrays pickled by value (a copy through a pipe; on GPUs one device->host->device copy per micro-batch,
~60 MB for a full Gemma2-9B batch, milliseconds over PCIe next to seconds of compute); the last stage applies final
norm, pooling and the head and puts the logits in the shared outbox. Budget, checkpointing, TTA and ordering are
therefore unchanged.

Schedule: stage 0 never waits for the next stage (queue puts are asynchronous) and the loop keeps `depth` batches
queued, so stage 1 works on micro-batch j while stage 0 runs micro-batch j+1, and on batch b while stage 0 starts
batch b+1. The pipeline bubble (one stage idle) is one micro-batch at the start and one at the end of the run (and
after each model switch), not per batch as in GPipe's flush-per-step training.

Weights: each stage reads only its own tensors from the export's safetensors (the whole fp16 model never sits in one
process); layers are split so that every stage holds about the same parameter bytes (embeddings on stage 0, final
norm and head on the last).

Faults: any stage process dying kills the group (pool.newly_dead reports it once); the surviving stages are stopped
and, when a data-parallel copy fits the devices (quantized with --fallback-quantize on GPUs, the same weights on the
CPU), one worker per distinct device takes over the remaining rows; else no worker is left and they get the prior.
Each stage halves its micro-batch on out-of-memory like worker.Runner, and re-runs rows whose half-precision output
is not finite through its own layers in fp32 compute (inference.upcast), passing fp32 hidden states on for those
rows.

Debug switch (tests): ARENA_DEBUG_STAGE_EXIT_AFTER=1:2 makes stage 1 call os._exit(3) after finishing 2 batches;
ARENA_DEBUG_SLEEP_PER_BATCH and ARENA_DEBUG_OOM_ABOVE apply per stage as in worker.py.
"""
from __future__ import annotations

import json
import os
import struct
import time
import traceback
import warnings
from functools import partial
from pathlib import Path

import numpy as np

from inference.pool import WorkerPool

DECODERS_MSG = "--parallel pipeline supports decoder models (llama, gemma2, ...)"
# 16-bit weight bytes times this is what a data-parallel fallback copy needs (bitsandbytes packing, scales,
# fp16 embeddings/norms kept) plus activations; measured shapes of 4-bit NF4 / 8-bit loads of 8-9B models.
FALLBACK_FACTOR = {"4bit": 0.40, "8bit": 0.65, "none": 1.0}
FALLBACK_OVERHEAD = 2 * 1024**3  # CUDA context, activations of a batch, allocator slack


# -- the split (pure) ---------------------------------------------------------------------------------------------
def split_layers(param_bytes_per_layer, n_stages: int, first_extra: int = 0,
                 last_extra: int = 0) -> list[tuple[int, int]]:
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
                         "export: export with lora.merge_on_export: true, or use --parallel data)")
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
    holder = torch.nn.Module()  # only this stage's modules leave the meta device
    holder.layers = torch.nn.ModuleList([bb.layers[i] for i in range(a, b)])
    if first:
        holder.embed_tokens = bb.embed_tokens
    if last:
        holder.norm = bb.norm
    holder.to_empty(device=device)
    for m in holder.modules():  # non-persistent buffers (Gemma2's embed_scale) are not in the weights: the
        bb._init_weights(m)  # model's own init sets them (and random weights that the loaded ones overwrite)
    targets = holder.state_dict(keep_vars=True)
    loaded = set()
    with torch.no_grad():  # one tensor at a time: device memory peaks at the stage's weights plus one tensor
        for f in weight_files(model_dir):
            with safe_open(str(f), "pt", device="cpu") as h:
                for k in h.keys():
                    name = _stage_key(k, a)
                    if name in targets:
                        targets[name].copy_(h.get_tensor(k))
                        loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        raise RuntimeError(f"{model_dir}: stage {s} weights missing from the export: {missing[:5]}")
    rotary = type(bb.rotary_emb)(config=config).to(device)  # buffers computed, not stored: build them for real
    head = None
    meta = read_meta(model_dir)
    if last:
        head = build_head(config.hidden_size, head_config_from_meta(meta))
        head.load_state_dict(load_file(str(Path(model_dir) / HEAD_FILE)))
        head.to(device=device, dtype=torch.float32)  # fp32 head, as in modeling.load_pretrained
    pooling = resolve_pooling(meta.get("head", {}).get("pooling", "auto"), config.model_type)
    Stage = _torch_stage_class()
    return Stage(config, a, b, list(holder.layers), rotary, embed=holder.embed_tokens if first else None,
                 norm=holder.norm if last else None, head=head, pooling=pooling).eval()


def _stage_key(key: str, start: int) -> str:
    """An export's weight name as the stage holds it: no 'model.' prefix (*ForCausalLM checkpoints), layer indices
    counted from the stage's first layer (a layer of another stage gets an index the stage does not have)."""
    name = key[len("model."):] if key.startswith("model.") else key
    i = layer_of(name)
    if name.startswith("layers.") and i is not None:
        name = f"layers.{i - start}." + name.split(".", 2)[2]
    return name


# -- stage processes ----------------------------------------------------------------------------------------------
def _stage_debug(s: int) -> dict:
    from inference.worker import _debug_settings

    debug = _debug_settings(-1)  # sleep and out-of-memory switches; worker exits are keyed by worker index
    spec = os.environ.get("ARENA_DEBUG_STAGE_EXIT_AFTER", "")
    if spec:
        stage, n = spec.split(":")
        debug["exit_after"] = int(n) if int(stage) == s else None
    return debug


class StageRunner:
    """One stage's forward passes with the same recovery as worker.Runner: halve the micro-batch on out-of-memory
    (a row that runs out alone gets NaN and is marked lost), and re-run rows whose half-precision output is not
    finite in fp32 compute. Rows a previous stage had to run in fp32 arrive as fp32 hidden states (`up`) and stay
    fp32 here."""

    def __init__(self, stage, device: str, oom_above: int = 0):
        self.stage, self.device, self.oom_above = stage, device, oom_above
        self.ooms = 0
        self.fp32_reruns = 0

    def forward(self, x, mask):
        import torch

        from inference.worker import _oom_error

        if self.oom_above and mask.numel() > self.oom_above:
            raise _oom_error()(f"debug: {mask.numel()} tokens > ARENA_DEBUG_OOM_ABOVE={self.oom_above}")
        with torch.inference_mode():
            return self.stage(x.to(self.device), mask.to(self.device))

    def _run(self, x, mask):
        """(output, bool tensor of rows that ran out of memory even alone)."""
        import torch

        from inference.worker import _empty_cache, _oom_error

        try:
            return self.forward(x, mask), torch.zeros(len(mask), dtype=torch.bool)
        except _oom_error():
            self.ooms += 1
            _empty_cache(self.device)
            if len(mask) == 1:
                shape = (1, 3) if self.stage.last else (1, mask.shape[1], self.stage.config.hidden_size)
                dtype = torch.float32 if self.stage.last else next(self.stage.layers.parameters()).dtype
                return torch.full(shape, float("nan"), dtype=dtype, device=self.device), torch.ones(1, dtype=torch.bool)
            half = len(mask) // 2
            (a, oa), (b, ob) = self._run(x[:half], mask[:half]), self._run(x[half:], mask[half:])
            return torch.cat([a, b]), torch.cat([oa, ob])

    def run(self, x, mask, up: dict, lost):
        """(output, fp32 outputs by row for rows that need them downstream, lost rows)."""
        import torch

        from inference.upcast import fp32_compute, runs_in_half

        out, oom = self._run(x, mask)
        lost = set(lost) | set(np.flatnonzero(oom.numpy()).tolist())
        if not runs_in_half(self.stage):
            return out, {}, lost
        finite = torch.isfinite(out.reshape(len(out), -1)).all(dim=1).cpu()
        redo = {i: up[i] for i in up} | {i: x[i:i + 1] for i in range(len(mask))
                                          if not finite[i] and i not in lost and i not in up}
        new_up = {}
        if redo:
            with fp32_compute(self.stage), torch.inference_mode():
                for i, xi in redo.items():
                    r = self.stage(xi.to(self.device), mask[i:i + 1].to(self.device))
                    if self.stage.last:
                        out[i] = r[0].to(out.dtype)
                    else:
                        new_up[i] = r.float().cpu()
            self.fp32_reruns += sum(1 for i in redo if i not in up)
        return out, new_up, lost


def _device_bytes(device: str) -> int | None:
    import torch

    return torch.cuda.get_device_properties(device).total_memory if device.startswith("cuda") else None


def stage_main(group: int, s: int, n_stages: int, device: str, threads: int, inbox, downstream, outbox,
               micro_batches: int) -> None:
    """Process entry point of stage `s`. Stage 0 reads the group's inbox (worker messages: "load", "batch",
    "stop"); every stage forwards "load"/"stop" downstream; hidden states go down as ("micro", batch_id, j, m,
    hidden, mask, fp32 rows, lost rows, busy seconds per stage, ooms, fp32 re-runs); the last stage answers the
    main process like a worker: ("ready", group, model_idx, seconds, {"device_bytes": [...]}) and ("result", ...)."""
    import gc

    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    debug = _stage_debug(s)
    last = s == n_stages - 1
    runner, current, own_load, done = None, None, 0.0, 0
    partial_results: dict[int, dict] = {}
    try:
        import torch

        from inference.worker import _empty_cache, _setup_device, next_message, pad_batch, quiet_transformers

        quiet_transformers()
        _setup_device(device, threads)
        while True:
            msg = next_message(inbox)
            kind = msg[0]
            if kind == "stop":
                if downstream is not None:
                    downstream.put(("stop",))
                break
            if kind == "load":
                _, k, spec = msg[:3]
                if current == k:
                    continue
                bounds = msg[3] if len(msg) > 3 else plan_stages(spec["model_dir"], n_stages)
                if downstream is not None:
                    downstream.put(("load", k, spec, bounds))
                runner = None
                gc.collect()
                _empty_cache(device)
                t0 = time.perf_counter()
                runner = StageRunner(load_stage(spec, device, bounds, s), device, debug["oom_above"])
                current, own_load = k, time.perf_counter() - t0
                if s == 0:
                    _pass_loaded(downstream, outbox, group, k, own_load, [_device_bytes(device)])
                continue
            if kind == "loaded":
                _, k, seconds, mems = msg
                _pass_loaded(downstream if not last else None, outbox, group, k, max(seconds, own_load),
                             mems + [_device_bytes(device)])
                continue
            if kind == "batch":
                _, bid, k, seqs, pad_id = msg
                if k != current:
                    raise RuntimeError(f"batch for model {k} but model {current} is loaded")
                ids, mask = pad_batch(seqs, pad_id)
                chunks = [c for c in np.array_split(np.arange(len(seqs)), min(micro_batches, len(seqs))) if len(c)]
                for j, rows in enumerate(chunks):
                    rows_t = torch.as_tensor(rows)
                    width = int(mask[rows_t].sum(dim=1).max())  # right padding: trailing columns only cost time
                    msg = ("micro", bid, j, len(chunks), ids[rows_t, :width], mask[rows_t, :width], {}, set(), [], 0, 0)
                    done = _stage_step(runner, msg, downstream, outbox, group, last, partial_results, debug, done)
                continue
            if kind == "micro":
                done = _stage_step(runner, msg, downstream, outbox, group, last, partial_results, debug, done)
                continue
            raise RuntimeError(f"stage {s}: unknown message {kind!r}")
    except Exception:
        outbox.put(("error", group, f"pipeline stage {s} ({device}): {traceback.format_exc()}"))
        outbox.close()
        outbox.join_thread()
        raise SystemExit(1)


def _to_wire(t):
    """A tensor as plain numpy data (pickled by value): torch's shared-memory tensor passing needs the sending
    process alive when the receiver unpickles, so a dead stage 0 would also break the micro-batches it had sent."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        return (str(t.dtype), t.view(torch.int16).numpy())
    return (str(t.dtype), t.numpy())


def _from_wire(w):
    import torch

    dtype, a = w
    t = torch.from_numpy(a)
    return t.view(getattr(torch, dtype.split(".")[1])) if dtype in ("torch.float16", "torch.bfloat16") else t


def _pass_loaded(downstream, outbox, group, k, seconds, mems) -> None:
    if downstream is not None:
        downstream.put(("loaded", k, seconds, mems))
    else:
        outbox.put(("ready", group, k, seconds, {"device_bytes": mems}))


def _stage_step(runner, msg, downstream, outbox, group, last, partial_results, debug, done) -> int:
    """Run one micro-batch through this stage and pass it on (or, on the last stage, collect the batch's logits)."""
    _, bid, j, m, x, mask, up, lost, busy, ooms, reruns = msg
    if isinstance(mask, tuple):  # from the previous stage's process
        x, mask, up = _from_wire(x), _from_wire(mask), {i: _from_wire(v) for i, v in up.items()}
    t0 = time.perf_counter()
    o0, r0 = runner.ooms, runner.fp32_reruns
    out, up, lost = runner.run(x, mask, up, lost)
    busy = busy + [time.perf_counter() - t0]
    ooms, reruns = ooms + runner.ooms - o0, reruns + runner.fp32_reruns - r0
    if not last:
        # one device->host copy per micro-batch; the next stage moves it onto its device
        downstream.put(("micro", bid, j, m, _to_wire(out), _to_wire(mask), {i: _to_wire(v) for i, v in up.items()},
                        lost, busy, ooms, reruns))
        if j == m - 1:
            done = _batch_done(debug, done, outbox, downstream)
        return done
    logits = out.float().cpu().numpy()
    if lost:
        logits[sorted(lost)] = np.nan
    acc = partial_results.setdefault(bid, {"parts": {}, "busy": None, "ooms": 0, "reruns": 0})
    acc["parts"][j] = logits
    acc["busy"] = busy if acc["busy"] is None else [a + b for a, b in zip(acc["busy"], busy)]
    acc["ooms"] += ooms
    acc["reruns"] += reruns
    if len(acc["parts"]) < m:
        return done
    del partial_results[bid]
    if debug["sleep"]:
        time.sleep(debug["sleep"])
        acc["busy"][-1] += debug["sleep"]
    # a pipeline's steady throughput is set by its slowest stage, not by the sum of the stages
    outbox.put(("result", group, bid, np.concatenate([acc["parts"][i] for i in range(m)]), max(acc["busy"]),
                acc["ooms"], acc["reruns"]))
    return _batch_done(debug, done, outbox)


def _batch_done(debug, done: int, outbox, downstream=None) -> int:
    done += 1
    if debug["exit_after"] is not None and done >= debug["exit_after"]:
        for q in [downstream] if downstream is not None else []:
            q.close()
            q.join_thread()
        outbox.close()
        outbox.join_thread()  # deliver what was finished, then die like a crashed process
        os._exit(3)
    return done


def fallback_worker_main(quantize: str, index: int, device: str, threads: int, inbox, outbox) -> None:
    """A data-parallel worker that loads every model quantized as `quantize` (the pipeline's fallback copy)."""
    from inference.worker import worker_main

    worker_main(index, device, threads, _QuantizingInbox(inbox, quantize), outbox)


class _QuantizingInbox:
    def __init__(self, inbox, quantize: str):
        self.inbox, self.quantize = inbox, quantize

    def get(self, timeout=None):
        msg = self.inbox.get(timeout=timeout)
        if msg[0] == "load":
            msg = (msg[0], msg[1], {**msg[2], "quantize": self.quantize})
        return msg


# -- the main process's side --------------------------------------------------------------------------------------
class StageGroup:
    """The stage processes of one pipeline, seen as one process by WorkerPool (exitcode, join, terminate, kill):
    any stage that exits makes the whole group exited."""

    def __init__(self, processes, devices=()):
        self.processes = processes
        self.devices = list(devices) or ["?"] * len(processes)
        self.first_exit: tuple[int, int] | None = None  # (stage, exit code) of the stage that ended the group

    @property
    def exitcode(self):
        """The exit code of the first stage seen exited (not of the ones stopped after it), else None."""
        if self.first_exit is None:
            exited = [(s, p.exitcode) for s, p in enumerate(self.processes) if p.exitcode is not None]
            if not exited:
                return None
            self.first_exit = next((e for e in exited if e[1] != 0), exited[0])
        return self.first_exit[1]

    def describe_exit(self) -> str:
        s, code = self.first_exit if self.first_exit else (None, None)
        return f"stage {s} ({self.devices[s]}) exited with code {code}" if s is not None else "a stage exited"

    def join(self, timeout=None):
        end = None if timeout is None else time.monotonic() + timeout
        for p in self.processes:
            p.join(None if end is None else max(0.0, end - time.monotonic()))

    def terminate(self):
        for p in self.processes:
            if p.exitcode is None:
                p.terminate()

    def kill(self):
        for p in self.processes:
            if p.exitcode is None:
                p.kill()

    def stop_survivors(self, wait: float = 5.0) -> None:
        """Terminate the stages still running (their memory is needed by the fallback workers)."""
        self.terminate()
        self.join(wait)
        self.kill()
        self.join(1.0)


class PipelinePool(WorkerPool):
    """A WorkerPool whose only worker is a pipeline group over all devices (index 0); after the group dies, the
    data-parallel fallback workers (indices 1..) join the pool."""

    def __init__(self, devices: list[str], micro_batches: int = 4, fallback_quantize: str = "auto",
                 model_bytes: int = 0):
        super().__init__(devices)
        self.micro_batches = micro_batches
        self.fallback_quantize = fallback_quantize
        self.model_bytes = model_bytes
        self.device_bytes: list[int | None] | None = None  # per stage, reported with "ready"
        self.links: list = []

    def start(self, target=None) -> None:
        from inference.pool import WorkerHandle, _environ, worker_visibility

        n = len(self.devices)
        self.links = [self.ctx.Queue() for _ in range(n)]  # links[0] is the group's inbox
        threads = self._threads()
        procs = []
        for s, dev in enumerate(self.devices):
            visible, local = worker_visibility(dev, os.environ.get("CUDA_VISIBLE_DEVICES"))
            down = self.links[s + 1] if s + 1 < n else None
            p = self.ctx.Process(target=stage_main, args=(0, s, n, local, threads, self.links[s], down, self.outbox,
                                                          self.micro_batches), daemon=True, name=f"arena-stage-{s}")
            with _environ("CUDA_VISIBLE_DEVICES", visible):
                p.start()
            procs.append(p)
        self.workers.append(WorkerHandle(0, f"pipeline over {','.join(self.devices)}", StageGroup(procs, self.devices),
                                         self.links[0]))

    def _threads(self) -> int:
        n_cpu = sum(d == "cpu" for d in self.devices)
        return max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu else 0

    def get(self, timeout: float):
        msg = super().get(timeout)
        if msg is not None and msg[0] == "ready" and len(msg) > 4:
            self.device_bytes = msg[4]["device_bytes"]
            msg = msg[:4]
        return msg

    def newly_dead(self, grace: float = 1.0, now: float | None = None):
        out = super().newly_dead(grace, now)
        for w in out:
            if isinstance(w.process, StageGroup):
                w.process.stop_survivors()
                w.note = f"{w.process.describe_exit()}; {self._start_fallback()}"
        return out

    def fallback_plan(self) -> tuple[str | None, str]:
        """(quantize of the fallback copies or None, why)."""
        q = self.fallback_quantize
        if q == "off":
            return None, "no data-parallel fallback (--fallback-quantize off)"
        if q == "auto":
            q = "4bit" if any(d.startswith("cuda") for d in self.devices) else "none"
        mems = self.device_bytes or [None] * len(self.devices)
        if any(d.startswith("cuda") for d in self.devices) and self.device_bytes is None:
            mems = [None] * len(self.devices)  # never loaded: memory unknown, try (a failed load ends in the prior)
        smallest = min((m for m in mems if m is not None), default=None)
        if not fallback_fits(self.model_bytes, q, smallest):
            need = (self.model_bytes * FALLBACK_FACTOR[q] + FALLBACK_OVERHEAD) / 1024**3
            return None, (f"no data-parallel copy fits ({q}: ~{need:.1f} GB, a device has "
                          f"{smallest / 1024**3:.1f} GB)")
        return q, ""

    def _start_fallback(self) -> str:
        from inference.pool import WorkerHandle, _environ, worker_visibility

        q, why = self.fallback_plan()
        if q is None:
            return f"pipeline group lost; {why}: the remaining rows get the prior"
        devices = list(dict.fromkeys(self.devices))  # one per device: cpu:2 is one CPU, all its cores
        threads = max(1, os.cpu_count() or 1) if "cpu" in devices else 0
        target = partial(fallback_worker_main, q)
        for dev in devices:
            i = len(self.workers)
            inbox = self.ctx.Queue()
            visible, local = worker_visibility(dev, os.environ.get("CUDA_VISIBLE_DEVICES"))
            p = self.ctx.Process(target=target, args=(i, local, threads, inbox, self.outbox), daemon=True,
                                 name=f"arena-fallback-{i}")
            with _environ("CUDA_VISIBLE_DEVICES", visible):
                p.start()
            self.workers.append(WorkerHandle(i, dev, p, inbox))
        quant = "unquantized" if q == "none" else q
        return (f"pipeline group lost; the remaining rows go to a data-parallel fallback: "
                f"{len(devices)} worker(s) with {quant} copies on {','.join(devices)}")

    def shutdown(self, wait: float) -> None:
        super().shutdown(wait)
        for w in self.workers:  # a group reads as exited once one stage has: make sure none is left running
            if isinstance(w.process, StageGroup):
                w.process.stop_survivors(2.0)
        for q in self.links[1:]:
            q.cancel_join_thread()
            q.close()
