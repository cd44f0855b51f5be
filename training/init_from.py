"""Multi-stage training: a run that starts from an earlier run's export (`model.init_from: EXPORT_DIR`).

An export (training/export.py) is an HF model directory plus the arena head and arena.json, so the backbone loads
like any pretrained model (partitioned under ZeRO-3, see training/model.py) and the head is either kept
(`model.init_head: keep`, the same shape required) or initialised afresh (`reset`). Only merged exports can be
continued: a LoRA adapter export (`lora.merge_on_export=false`) is refused. The run records where it started in
run_info.json and in its own export's arena.json (`init_from`), so a stage-2 model names the stage-1 export it grew
from (and, nested, whatever that one grew from).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from inference.modeling import HEAD_FILE, META_FILE, build_head, load_head_state, read_meta, resolve_pooling

from .config import ConfigError, RunConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def read_source(path: str | Path) -> dict[str, Any]:
    """arena.json of an export that can be continued, or ConfigError saying what is missing."""
    p = Path(path)
    key = f"model.init_from={path}"
    if not p.is_dir():
        raise ConfigError(f"{key}: no such directory (give an export: a run's output_dir/final)")
    if not (p / META_FILE).exists():
        raise ConfigError(f"{key}: not an exported arena model ({META_FILE} is missing; give a run's output_dir/final)")
    meta = read_meta(p)
    if meta.get("adapter"):
        raise ConfigError(f"{key}: a LoRA adapter export (arena.json adapter=true); only merged exports can be "
                          "continued: export the source run with lora.merge_on_export=true")
    missing = [f for f in ("config.json", HEAD_FILE) if not (p / f).exists()]
    if not any((p / f).exists() for f in WEIGHT_FILES):
        missing.append("model.safetensors")
    if missing:
        raise ConfigError(f"{key}: incomplete export, missing {', '.join(missing)}")
    return meta


def source_hidden_size(path: str | Path) -> int:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return cfg.get("hidden_size") or (cfg.get("text_config") or {})["hidden_size"]


def head_shapes_in_file(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the exported head, read from the safetensors header (no weights loaded)."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / HEAD_FILE), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def head_shapes(hidden: int, head_cfg) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the head this run builds (on the meta device: nothing allocated)."""
    with torch.device("meta"):
        head = build_head(hidden, head_cfg)
    return {k: tuple(v.shape) for k, v in head.state_dict().items()}


def _fmt(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in sorted(shapes.items()))


def check_source(cfg: RunConfig) -> dict[str, Any]:
    """The export is complete and merged; with init_head=keep its head fits the run's model.head (same parameter
    shapes, same pooled token). Returns its arena.json."""
    m = cfg.model
    meta = read_source(m.init_from)
    if m.init_head == "keep":
        mine = head_shapes(source_hidden_size(m.init_from), m.head)
        theirs = head_shapes_in_file(m.init_from)
        if mine != theirs:
            raise ConfigError(f"model.init_head=keep: the export's head ({meta.get('head')}: {_fmt(theirs)}) does not "
                              f"fit this run's model.head ({_fmt(mine)}); set model.head to the export's or "
                              "model.init_head=reset")
        model_type = json.loads((Path(m.init_from) / "config.json").read_text()).get("model_type", "")
        pooling = resolve_pooling(m.head.pooling, model_type)
        if meta.get("pooling") and pooling != meta["pooling"]:
            raise ConfigError(f"model.head.pooling: the export's head reads the {meta['pooling']} token, this run "
                              f"would pool the {pooling} one; keep the export's pooling or set model.init_head=reset")
    return meta


def format_differences(source: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """FormatConfig keys whose values differ between the export and this run (a model sees another template)."""
    return [f"{k}: {source.get(k)!r} -> {run.get(k)!r}" for k in sorted(set(source) | set(run))
            if source.get(k) != run.get(k)]


def origin_record(cfg: RunConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What run_info.json and the new export's arena.json say about where this run started."""
    return {"path": str(Path(cfg.model.init_from).resolve()), "step": meta.get("step"),
            "val_logloss": meta.get("val_logloss"), "init_head": cfg.model.init_head,
            "init_from": meta.get("init_from")}  # the source's own origin: the whole chain of stages


def load_head(model, path: str | Path) -> None:
    """Copy the exported head into `model.head` (cast to its dtype). Under ZeRO-3 call it inside
    gathered(head parameters, modifier_rank=0): rank 0's values are then broadcast."""
    model.head.load_state_dict({k: v.to(next(model.head.parameters()).dtype) for k, v in load_head_state(path).items()})
