"""Blend several models' predictions: fit the weights of their arithmetic mean on labelled rows, or apply them.

The blend is the same one arena-predict computes for an ensemble (`--weights`, the Kaggle kernel's WEIGHTS): a
weighted arithmetic mean of each model's served probabilities, weights non-negative and summing to 1. Its log loss
is convex in the weights, so the fit finds the global optimum: the multiplicative (EM) update for mixture weights,
w_i <- w_i * mean_rows(p_i(y) / p_blend(y)), which stays on the simplex and never increases the loss, stopped when
the Frank-Wolfe duality gap (an upper bound on the distance to the optimal loss) is below `tol`.

Optionally one temperature T is fitted afterwards on the blend, applied as p^(1/T) renormalised (= softmax of
log p / T, the same golden-section fit training uses for logits). arena-predict cannot apply it (each model already
carries its own temperature), so it only matters for files written here with --temperature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .reading import DataError, Problem


@dataclass
class Fit:
    weights: np.ndarray
    iterations: int
    gap: float  # Frank-Wolfe duality gap at the end: loss - optimal loss <= gap


def fit_weights(probs: Sequence[np.ndarray], labels: np.ndarray, tol: float = 1e-10, max_iter: int = 50000) -> Fit:
    """Non-negative weights summing to 1 minimising the log loss of sum_i w_i * probs[i] on `labels`."""
    y = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(y))
    # only the true class matters: a convex combination of rows summing to 1 sums to 1
    p = np.stack([np.asarray(q, dtype=np.float64)[rows, y] for q in probs], axis=1)
    p = np.clip(p, np.finfo(np.float64).eps, None)
    m = p.shape[1]
    w = np.full(m, 1.0 / m)
    gap = np.inf
    for it in range(max_iter):
        ratio = (p / (p @ w)[:, None]).mean(axis=0)  # = -gradient
        gap = float(ratio.max() - ratio @ w)
        if gap <= tol:
            break
        w = w * ratio
        w /= w.sum()
    # A boundary optimum is approached geometrically (weights ~1e-10, not 0): take a single model when it is as good.
    nll = lambda v: float(-np.mean(np.log(p @ v)))  # noqa: E731
    best = int(np.argmin([nll(e) for e in np.eye(m)]))
    if nll(np.eye(m)[best]) <= nll(w):
        w = np.eye(m)[best]
    return Fit(w, it, gap)


def blend(probs: Sequence[np.ndarray], weights: Sequence[float], temperature: float = 1.0) -> np.ndarray:
    """sum_i w_i * probs[i] (weights normalised to sum 1), then p^(1/temperature) renormalised."""
    from inference.submission import softmax

    w = np.asarray(weights, dtype=np.float64)
    out = np.tensordot(w / w.sum(), np.stack([np.asarray(q, dtype=np.float64) for q in probs]), axes=1)
    if temperature == 1.0:
        return out
    return softmax(np.log(np.clip(out, np.finfo(np.float64).tiny, None)), temperature)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the log loss of p^(1/T) renormalised (training.report.fit_temperature on log p)."""
    from training.report import fit_temperature as fit_on_logits

    return fit_on_logits(np.log(np.clip(probs, np.finfo(np.float64).tiny, None)), labels)


def parse_weights(text: str) -> list[float]:
    """'0.6,0.4' -> [0.6, 0.4]; non-negative, not all zero. Raises ValueError."""
    try:
        w = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if any(not np.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"--weights must be finite, non-negative and not all zero, got {text!r}")
    return w


def align(files: Sequence[tuple[str, list, np.ndarray]], ids: Sequence, ids_name: str,
          exact: bool) -> list[np.ndarray]:
    """Each file's probabilities in `ids` order. Raises DataError naming a file and the ids it lacks, and with
    `exact` also the ids it has beyond `ids` (files to be blended row by row must hold the same rows)."""
    want = [str(i) for i in ids]
    out, problems = [], []
    for name, fids, probs in files:
        index = {str(i): k for k, i in enumerate(fids)}
        missing = [i for i in want if i not in index]
        if missing:
            problems.append(Problem(name, f"{len(missing)} id(s) of {ids_name} missing, e.g. {missing[:5]}",
                                    column="id"))
            continue
        extra = sorted(set(index) - set(want)) if exact else []
        if extra:
            problems.append(Problem(name, f"{len(extra)} id(s) not in {ids_name}, e.g. {extra[:5]}", column="id"))
            continue
        out.append(probs[[index[i] for i in want]])
    if problems:
        raise DataError(problems)
    return out
