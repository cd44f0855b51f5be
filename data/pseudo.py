"""Pseudo-labels: turn a model's probabilities for unlabelled battles into a soft-labelled training file.

The output is a competition-format train.csv whose three winner columns hold the predicted probabilities (soft
labels summing to 1). Rows the model is unsure of (max probability below --min-confidence) are dropped, and so are
battles that also occur in an excluded file (the training or validation data: a pseudo-labelled copy of a
validation row would leak it), in either A/B order, compared by a normalised text hash.
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .reading import LABEL_COLUMNS, TEXT_COLUMNS, Battle, DataError, Problem

OPTIONAL_COLUMNS = ("model_a", "model_b")


def _norm(turns: Iterable[str]) -> str:
    return "\x1e".join(" ".join(t.lower().split()) for t in turns)


def battle_key(prompt: Sequence[str], response_a: Sequence[str], response_b: Sequence[str]) -> str:
    """Hash of the normalised texts (lower case, whitespace collapsed) of one battle in this A/B order."""
    text = "\x1f".join((_norm(prompt), _norm(response_a), _norm(response_b)))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def battle_keys(battles: Iterable[Battle]) -> set[str]:
    """Keys of the battles in both A/B orders (a swapped copy is the same battle)."""
    keys = set()
    for b in battles:
        keys.add(battle_key(b.prompt, b.response_a, b.response_b))
        keys.add(battle_key(b.prompt, b.response_b, b.response_a))
    return keys


@dataclass
class Selection:
    keep: np.ndarray  # bool per data row
    low_confidence: int
    excluded: int  # among the rows confident enough


def select(battles: Sequence[Battle], probs: np.ndarray, min_confidence: float, excluded: set[str]) -> Selection:
    """Which rows become pseudo-labels: max probability >= min_confidence and not in the excluded set."""
    confident = probs.max(axis=1) >= min_confidence
    clash = np.array([battle_key(b.prompt, b.response_a, b.response_b) in excluded for b in battles], dtype=bool)
    return Selection(confident & ~clash, int((~confident).sum()), int((confident & clash).sum()))


def align_predictions(battles: Sequence[Battle], pred_ids: Sequence, pred_probs: np.ndarray,
                      pred_name: str) -> tuple[np.ndarray, int]:
    """(probabilities in data-row order, count of prediction ids that are not data rows). Raises DataError naming
    data ids the predictions lack."""
    index = {str(i): k for k, i in enumerate(pred_ids)}
    missing = [str(b.id) for b in battles if str(b.id) not in index]
    if missing:
        raise DataError([Problem(pred_name, f"{len(missing)} id(s) of the data file have no prediction, e.g. "
                                 f"{missing[:5]}", column="id")])
    rows = [index[str(b.id)] for b in battles]
    return pred_probs[rows], len(index) - len(set(rows))


def raw_rows(path: str | Path) -> tuple[list[str], list[dict]]:
    """(header, records) exactly as in the CSV, so texts are written back byte for byte (JSON turn lists intact)."""
    from .reading import read_rows

    header, rows = read_rows(Path(path))
    return header, [rec for _, rec in rows]


def render(header: Sequence[str], records: Sequence[dict], probs: np.ndarray) -> str:
    """The training CSV in Kaggle's column order: id, model_a/model_b when the data has them, the texts, the soft
    labels (the probabilities as written by repr: exact floats)."""
    cols = ["id", *[c for c in OPTIONAL_COLUMNS if c in header], *TEXT_COLUMNS, *LABEL_COLUMNS]
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for rec, p in zip(records, probs):
        w.writerow([rec.get(c, "") for c in cols[: -len(LABEL_COLUMNS)]] + [repr(float(x)) for x in p])
    return buf.getvalue()
