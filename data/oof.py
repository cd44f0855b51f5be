"""Out-of-fold predictions: join k fold runs' validation predictions into one submission-format file.

Each training row is predicted once, by the run that held its fold out, with what arena-predict would serve for it
(`inference.submission.served_probs`: the A/B-swap average at the export's temperature). Such a file is what
blending weights and pseudo-label thresholds are fitted on without leaking training rows.

A run dir (arena-train's output_dir) holds config.yaml (the resolved config: data.train_csv, data.valid_fold,
data.num_folds, data.fold_seed), val_predictions.npz (ids, logits, logits_swap, labels) and final/arena.json
(temperature, temperature_no_tta).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .reading import DataError, Problem

PREDICTIONS_FILE = "val_predictions.npz"  # training/train.py PREDICTIONS_FILE (not imported: that pulls in torch)
META_FILE = Path("final") / "arena.json"


@dataclass
class FoldRun:
    run_dir: str
    train_csv: str
    valid_fold: int
    num_folds: int
    fold_seed: int
    ids: list  # validation ids as str
    probs: np.ndarray  # (rows, 3) served probabilities


def load_run(run_dir: str | Path) -> FoldRun:
    """Read one fold run. Raises DataError naming the file that is missing or wrong."""
    import yaml

    from inference.submission import served_probs

    d = Path(run_dir)
    if not d.is_dir():
        raise DataError([Problem(str(d), "not a directory (expected an arena-train output dir)")])
    cfg_path, npz_path, meta_path = d / "config.yaml", d / PREDICTIONS_FILE, d / META_FILE
    for p, what in ((cfg_path, "the resolved config"), (npz_path, "the validation predictions (a run that "
                    "evaluated on a held-out fold)"), (meta_path, "the final export's metadata")):
        if not p.is_file():
            raise DataError([Problem(str(p), f"missing: {what}")])
    try:
        data = (yaml.safe_load(cfg_path.read_text()) or {}).get("data") or {}
    except (yaml.YAMLError, AttributeError) as e:
        raise DataError([Problem(str(cfg_path), f"not a YAML config ({e})")]) from None
    if data.get("valid_csv"):
        raise DataError([Problem(str(cfg_path), f"data.valid_csv={data['valid_csv']}: validated on a separate file, "
                                 "not on a fold of data.train_csv, so its predictions are not out-of-fold",
                                 column="data.valid_csv")])
    if data.get("valid_fold") is None:
        raise DataError([Problem(str(cfg_path), "data.valid_fold is null: the run held no fold out",
                                 column="data.valid_fold")])
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise DataError([Problem(str(meta_path), f"not JSON ({e})")]) from None
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise DataError([Problem(str(npz_path), f"not a NumPy .npz file ({e})")]) from None
    absent = [k for k in ("ids", "logits") if k not in arrays]
    if absent:
        raise DataError([Problem(str(npz_path), f"missing array(s) {absent} (has {sorted(arrays)}); a run from "
                                 "before ids were saved must be re-evaluated")])
    logits = arrays["logits"].astype(np.float64)
    swap = arrays.get("logits_swap")
    swap = None if swap is None else swap.astype(np.float64)
    ids = [str(i) for i in arrays["ids"].tolist()]
    if logits.shape != (len(ids), 3) or (swap is not None and swap.shape != logits.shape):
        raise DataError([Problem(str(npz_path), f"logits {logits.shape} / logits_swap "
                                 f"{None if swap is None else swap.shape} do not match {len(ids)} ids x 3")])
    bad = np.flatnonzero(~np.all(np.isfinite(logits), axis=1))
    if len(bad):
        raise DataError([Problem(str(npz_path), "non-finite logits", row_id=ids[i], column="logits") for i in bad[:5]])
    return FoldRun(str(d), str(data.get("train_csv") or ""), int(data["valid_fold"]), int(data.get("num_folds", 5)),
                   int(data.get("fold_seed", 0)), ids, served_probs(logits, swap, meta))


def check_compatible(runs: Sequence[FoldRun]) -> None:
    """All runs split the same file the same way (train_csv, num_folds, fold_seed). Raises DataError."""
    first = runs[0]
    problems = []
    for r in runs[1:]:
        for key in ("train_csv", "num_folds", "fold_seed"):
            if getattr(r, key) != getattr(first, key):
                problems.append(Problem(str(Path(r.run_dir) / "config.yaml"), f"{getattr(r, key)!r} differs from "
                                        f"{getattr(first, key)!r} in {first.run_dir}: runs of different splits",
                                        column=f"data.{key}"))
    if problems:
        raise DataError(problems)


def join_oof(runs: Sequence[FoldRun], train_ids: Sequence, train_name: str) -> np.ndarray:
    """(rows, 3) out-of-fold probabilities in `train_ids` order. Refuses overlapping ids (naming both run dirs),
    training ids no run predicted, and predicted ids that are not in the training file."""
    owner: dict[str, tuple[int, int]] = {}  # id -> (run, row)
    overlaps: dict[tuple[int, int], list[str]] = {}  # (earlier run, later run) -> shared ids
    for k, r in enumerate(runs):
        for j, rid in enumerate(r.ids):
            if rid in owner:
                overlaps.setdefault((owner[rid][0], k), []).append(rid)
            else:
                owner[rid] = (k, j)
    problems = []
    for (a, b), shared in overlaps.items():
        ra, rb = runs[a], runs[b]
        problems.append(Problem(rb.run_dir, f"id also predicted by {ra.run_dir} ({len(shared)} overlapping id(s); "
                                f"valid_fold {ra.valid_fold} and {rb.valid_fold})", row_id=shared[0], column="id"))
    if problems:
        raise DataError(problems)
    want = [str(i) for i in train_ids]
    extra = set(owner) - set(want)
    for rid in sorted(extra)[:5]:
        problems.append(Problem(runs[owner[rid][0]].run_dir, f"predicted id is not in {train_name}",
                                row_id=rid, column="id"))
    missing = [i for i in want if i not in owner]
    if missing:
        held = sorted({r.valid_fold for r in runs})
        absent = [f for f in range(runs[0].num_folds) if f not in held]
        problems.append(Problem(train_name, f"{len(missing)} training id(s) have no out-of-fold prediction, e.g. "
                                f"{missing[:5]}; folds held out by the runs: {held}, no run for fold(s) {absent}",
                                column="id"))
    if problems:
        raise DataError(problems)
    return np.stack([runs[owner[i][0]].probs[owner[i][1]] for i in want]) if want else np.zeros((0, 3))
