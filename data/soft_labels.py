"""Soft targets from a submission-format file (`data.soft_labels`), joined to a training file by id.

Any `arena-predict` output, or `arena-data oof` of K fold runs (teachers' out-of-fold probabilities), is such a file.
The join happens after the tokenized dataset is loaded, so changing the soft labels never re-tokenizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np



def read_soft_labels(path: str | Path) -> dict[str, np.ndarray]:
    """id (as a string) -> probabilities (3,), each row checked to sum to 1 (then renormalised exactly)."""
    from .scoring import read_probabilities

    ids, probs = read_probabilities(path)
    return {str(rid): p for rid, p in zip(ids, probs)}


@dataclass
class SoftJoin:
    soft: np.ndarray  # (n, 3) float32 targets, NO_SOFT (-1) rows where none
    joined: int  # training rows that got a soft label from the file
    missing: list[str]  # ids (of the rows that needed one) absent from the file
    unused: int  # ids of the file that are not in the training file (ignored)


def join_soft_labels(ids, soft: np.ndarray, table: dict[str, np.ndarray], needed: np.ndarray) -> SoftJoin:
    """Soft targets of a file's rows after joining `table` by id; the file's own soft rows (pseudo-labels) are kept
    where the table has nothing. `needed` marks the rows that must find their id in the table (the training rows)."""
    out = np.asarray(soft, dtype=np.float32).copy()
    ids = [str(i) for i in ids]
    hit = np.array([i in table for i in ids], dtype=bool)
    for k in np.flatnonzero(hit):
        out[k] = table[ids[k]]
    missing = [ids[k] for k in np.flatnonzero(needed & ~hit)]
    return SoftJoin(soft=out, joined=int(hit.sum()), missing=missing, unused=len(set(table) - set(ids)))
