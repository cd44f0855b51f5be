"""The competition metric: multiclass log loss with eps="auto", and submission checks."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .reading import LABEL_COLUMNS, SOFT_TOLERANCE, DataError, Problem

SUBMISSION_COLUMNS = ("id", *LABEL_COLUMNS)


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood as Kaggle computes it (scikit-learn's `log_loss(eps="auto")`).

    Probabilities are clipped to [eps, 1 - eps] with eps = float64 machine epsilon, then each row is renormalised.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or p.shape[1] != 3 or len(p) != len(y):
        raise ValueError(f"expected probs of shape (n, 3) and n labels, got {p.shape} and {y.shape}")
    eps = np.finfo(np.float64).eps
    p = np.clip(p, eps, 1 - eps)
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))


def read_submission(path: str | Path):
    """A submission as a DataFrame indexed by id. Raises DataError naming what is wrong."""
    import pandas as pd

    name = str(path)
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises many types for unreadable files
        raise DataError([Problem(name, f"cannot read as CSV ({type(e).__name__}: {e})")]) from None
    if tuple(df.columns) != SUBMISSION_COLUMNS:
        raise DataError([Problem(name, f"header must be {','.join(SUBMISSION_COLUMNS)}, got {','.join(map(str, df.columns))}")])
    problems = []
    dup = df["id"][df["id"].duplicated()]
    for rid in dup.head(10):
        problems.append(Problem(name, "id appears more than once", row_id=str(rid), column="id"))
    for col in LABEL_COLUMNS:
        vals = pd.to_numeric(df[col], errors="coerce")
        bad = df["id"][~np.isfinite(vals.to_numpy(dtype=float)) | (vals < 0).to_numpy()]
        for rid in bad.head(10):
            problems.append(Problem(name, "probability is not a finite non-negative number", row_id=str(rid), column=col))
    if problems:
        raise DataError(problems)
    return df.set_index("id")


def score_submission(sub_path: str | Path, labels_path: str | Path) -> dict[str, float]:
    """Log loss and accuracy of a submission file against a labelled CSV (train.csv format)."""
    from .reading import read_battles, require_hard_labels

    battles = read_battles(labels_path, labels=True)
    require_hard_labels(battles, str(labels_path))
    sub = read_submission(sub_path)
    ids = [b.id for b in battles]
    missing = [i for i in ids if i not in sub.index]
    if missing:
        raise DataError([Problem(str(sub_path), f"{len(missing)} labelled ids are missing, e.g. {missing[:5]}", column="id")])
    extra = set(sub.index) - set(ids)
    if extra:
        raise DataError([Problem(str(sub_path), f"{len(extra)} ids are not in {labels_path}, e.g. {sorted(extra)[:5]}", column="id")])
    probs = sub.loc[ids, list(LABEL_COLUMNS)].to_numpy(dtype=np.float64)
    y = np.array([b.label for b in battles])
    return {"log_loss": log_loss(probs, y), "accuracy": accuracy(probs, y), "rows": len(y), "uniform": math.log(3)}


SUM_TOLERANCE = SOFT_TOLERANCE  # a probability row may sum to 1 +- this (rounded CSV values); anything else is a wrong file


def read_probabilities(path: str | Path, tol: float = SUM_TOLERANCE) -> tuple[list, np.ndarray]:
    """(ids in file order, (rows, 3) float64 probabilities) of a submission-format file whose rows must sum to 1.

    For commands that combine or relabel predictions (merge, oof, blend, pseudo-label): a row that does not sum to 1
    means a wrong file (logits, a truncated write), so it is refused, naming file, id and columns; rows are returned
    renormalised to sum to exactly 1. Raises DataError.
    """
    sub = read_submission(path)
    probs = sub[list(LABEL_COLUMNS)].to_numpy(dtype=np.float64)
    sums = probs.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > tol)
    if len(bad):
        cols = "+".join(LABEL_COLUMNS)
        # pandas drops line numbers: data row i is CSV line i + 2 (the header is line 1)
        problems = [Problem(str(path), f"probabilities sum to {sums[i]:.6g}, not 1 (tolerance {tol:g})",
                            row_id=str(sub.index[i]), column=cols, line=int(i) + 2) for i in bad[:10]]
        if len(bad) > 10:
            problems.append(Problem(str(path), f"... {len(bad)} rows in total do not sum to 1", column=cols))
        raise DataError(problems)
    return list(sub.index), probs / sums[:, None]
