"""The submission file and the probability arithmetic behind it.

A submission that is malformed scores nothing, so every write goes through `sanitize` (finite, non-negative rows
summing to 1; anything else becomes the prior) and lands atomically (temporary file + os.replace): a reader, or a
kill at any moment, sees either the previous complete file or the new complete file.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from data.atomic import write_atomic
from data.reading import LABEL_COLUMNS, SWAP_CLASSES

HEADER = ("id", *LABEL_COLUMNS)
SWAP = list(SWAP_CLASSES)  # P(A wins | swapped) is P(B wins | original); tie stays tie


def resolve_prior(priors: Sequence[Sequence[float] | None], weights: Sequence[float] | None = None) -> np.ndarray:
    """The fallback distribution: the weighted mean of the models' training priors (uniform when none has one)."""
    weights = list(weights) if weights is not None else [1.0] * len(priors)
    rows, ws = [], []
    for p, w in zip(priors, weights):
        if p is None:
            continue
        v = np.asarray(p, dtype=np.float64)
        if v.shape != (3,) or not np.all(np.isfinite(v)) or np.any(v < 0) or v.sum() <= 0:
            raise ValueError(f"a prior must be 3 non-negative numbers, got {list(p)}")
        rows.append(v / v.sum())
        ws.append(w)
    if not rows or sum(ws) <= 0:
        return np.full(3, 1.0 / 3.0)
    out = np.average(np.stack(rows), axis=0, weights=ws)
    return out / out.sum()


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature (float64; the calibrated temperature travels in arena.json)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def tta_average(probs: np.ndarray, probs_swapped: np.ndarray) -> np.ndarray:
    """Mean of the prediction and the swapped input's prediction mapped back to the original A/B order.

    Makes the predictor exactly symmetric: p_A(x) == p_B(swap(x)).
    """
    return 0.5 * (np.asarray(probs) + np.asarray(probs_swapped)[..., SWAP])


def served_probs(logits: np.ndarray, logits_swap: np.ndarray | None, meta: dict) -> np.ndarray:
    """What arena-predict serves for one model: (rows, 3) probabilities, NaN where a row has no logits.

    Training fits one temperature for the TTA average (arena.json `temperature`) and one for a single view
    (`temperature_no_tta`): averaging the two views already softens the probabilities. Rows with both views get the
    A/B-swap average, rows with only the first view its softmax (arena-data oof serves validation rows the same way).
    """
    t_tta = float(meta.get("temperature") or 1.0)
    t_one = float(meta.get("temperature_no_tta") or t_tta)
    p = softmax(logits, t_one)
    if logits_swap is None:
        return p
    have_swap = np.all(np.isfinite(logits_swap), axis=1)
    p[have_swap] = tta_average(softmax(logits[have_swap], t_tta), softmax(logits_swap[have_swap], t_tta))
    return p


def ensemble(per_model: Sequence[np.ndarray], weights: Sequence[float], prior: np.ndarray) -> np.ndarray:
    """Weighted arithmetic mean of the models' probabilities, row by row.

    A model with no prediction for a row (NaN, e.g. the budget ran out before it got there) is left out of that
    row and the other weights are renormalised; a row no model predicted gets the prior.
    """
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in per_model])  # (models, rows, 3)
    w = np.asarray(weights, dtype=np.float64)[:, None]
    have = np.all(np.isfinite(stack), axis=2)  # (models, rows)
    wsum = (w * have).sum(axis=0)  # (rows,)
    total = np.where(have[..., None], stack, 0.0) * w[..., None]
    out = total.sum(axis=0) / np.where(wsum > 0, wsum, 1.0)[:, None]
    out[wsum <= 0] = prior
    return out


def sanitize(probs: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities safe to submit, mask of rows replaced by the prior). Rows are renormalised to sum to 1."""
    p = np.array(probs, dtype=np.float64, copy=True)
    bad = ~np.all(np.isfinite(p), axis=1) | np.any(p < 0, axis=1) | (np.nan_to_num(p).sum(axis=1) <= 0)
    p[bad] = prior
    return p / p.sum(axis=1, keepdims=True), bad


def format_rows(ids: Sequence, probs: np.ndarray) -> str:
    lines = [",".join(HEADER)]
    for rid, row in zip(ids, probs):
        lines.append(f"{rid},{float(row[0])!r},{float(row[1])!r},{float(row[2])!r}")
    return "\n".join(lines) + "\n"


def write_submission(path: str | Path, ids: Sequence, probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Atomically write `id,winner_model_a,winner_model_b,winner_tie` rows in the given id order.

    Returns the mask of rows that had to be replaced by the prior (non-finite or invalid input).
    """
    if len(ids) != len(probs):
        raise ValueError(f"{len(ids)} ids but {len(probs)} probability rows")
    safe, bad = sanitize(probs, prior)
    write_atomic(path, format_rows(ids, safe))
    return bad


def validate_submission(path: str | Path, ids: Sequence, tol: float = 1e-6) -> list[str]:
    """Problems that would make Kaggle reject or mis-score the file (empty list: valid).

    Checks the exact header, every test id exactly once in test order, and finite, non-negative rows summing to 1.
    """
    import csv

    path = Path(path)
    if not path.exists():
        return [f"{path}: missing"]
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(rows[0]) != HEADER:
        return [f"{path}: header must be {','.join(HEADER)}, got {','.join(rows[0]) if rows else '(empty file)'}"]
    body = rows[1:]
    problems = []
    want = [str(i) for i in ids]
    got = [r[0] if r else "" for r in body]
    if got != want:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        problems.append(f"{path}: ids differ from the test file ({len(got)} rows vs {len(want)}; missing e.g. "
                        f"{missing}, unexpected e.g. {extra}, or a different order)")
    for r in body:
        try:
            v = [float(x) for x in r[1:]]
        except ValueError:
            problems.append(f"{path}: id {r[0]}: not numbers: {r[1:]}")
            continue
        if len(v) != 3 or not all(math.isfinite(x) and x >= 0 for x in v) or abs(sum(v) - 1.0) > tol:
            problems.append(f"{path}: id {r[0]}: not a probability row: {r[1:]}")
        if len(problems) > 10:
            break
    return problems
