"""Crash-safe, exactly resumable checkpoints.

A checkpoint is one directory `output_dir/checkpoints/step_XXXXXXXX/` holding the DeepSpeed engine state (ZeRO
shards of weights and optimizer, the LR scheduler), each rank's RNG states, `trainer_state.json` (step, sampler
position, best validation loss) and the run config. It is written under a temporary name and renamed when complete;
the `latest` pointer file is replaced last (atomically), so a crash at any moment leaves the previous checkpoint
as the one `resume=auto` picks. The directories assume a file system shared by all ranks (as DeepSpeed does).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from data.atomic import write_atomic  # noqa: F401  (train.py and metrics.py import it from here)

from .config import RESUMABLE_CHANGES, RunConfig, config_diff, to_dict
from .distributed import Dist

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"


def checkpoint_root(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def replace_dir(src: Path, dst: Path) -> None:
    """Make the complete directory `src` the new `dst`, so that a crash at any moment leaves a usable `dst` or a
    recoverable one: the old `dst` is renamed aside (`.NAME.old`), `src` renamed into place, then the old one
    deleted. Renames are atomic on one filesystem; recover_dir() undoes a crash between the two."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    recover_dir(dst)
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: Path) -> bool:
    """After a crash inside replace_dir: put the old directory back when the new one never arrived."""
    dst = Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    if not dst.exists() and old.is_dir():
        os.replace(old, dst)
        return True
    return False


def rng_state() -> dict:
    """RNG states as tensors and plain values, so that they load with torch.load(weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, cfg: RunConfig, dist: Dist, trainer_state: dict) -> Path:
    """Write checkpoint `trainer_state["step"]` (collective: every rank calls it). Returns its directory."""
    root = checkpoint_root(cfg)
    step = trainer_state["step"]
    tmp_tag, tag = f".tmp_{tag_of(step)}", tag_of(step)
    if dist.is_main:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # leftovers of a crash during an earlier save
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{dist.rank}.pt")
    dist.barrier()
    if dist.is_main:
        write_atomic(root / tmp_tag / STATE_FILE, json.dumps({**trainer_state, "world_size": dist.world_size}, indent=2))
        write_atomic(root / tmp_tag / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        replace_dir(root / tmp_tag, root / tag)
        write_atomic(root / LATEST, tag)  # last: until here the previous checkpoint stays "latest"
        prune(root, cfg.train.keep_checkpoints, keep=tag)
    dist.barrier()
    return root / tag


def prune(root: Path, keep_last: int, keep: str) -> None:
    tags = sorted(p.name for p in root.glob("step_*") if p.is_dir())
    for name in tags[:-keep_last]:
        if name != keep:
            shutil.rmtree(root / name, ignore_errors=True)


def find_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from: resume=auto -> output_dir's `latest` (None if there is none), a path -> it."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume)
    pointer = checkpoint_root(cfg) / LATEST
    if not pointer.exists():
        return None
    ckpt = checkpoint_root(cfg) / pointer.read_text().strip()
    if not (ckpt / STATE_FILE).exists():
        raise FileNotFoundError(f"{pointer} names {ckpt.name}, which is incomplete or missing; "
                                f"pass resume=<checkpoint dir> or resume=never")
    return ckpt


def check_resumable(cfg: RunConfig, ckpt: Path, dist: Dist) -> dict:
    """The checkpoint's trainer state, after checking it belongs to this run (same config and world size)."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state["world_size"] != dist.world_size:
        raise ValueError(f"{ckpt} was written by {state['world_size']} processes, this run has {dist.world_size}; "
                         "ZeRO shards are per rank: resume with the same number of processes")
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    changed = [k for k in config_diff(saved, to_dict(cfg)) if not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise ValueError(f"cannot resume from {ckpt}: these settings differ from the checkpoint's config: "
                         f"{', '.join(changed)} (use a new output_dir or resume=never)")
    return state


def load_checkpoint(engine, ckpt: Path, dist: Dist) -> None:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG states."""
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt}")
    set_rng_state(torch.load(ckpt / f"rng_rank{dist.rank}.pt", weights_only=True))
