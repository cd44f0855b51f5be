"""Tokenized datasets, cached on disk with `datasets` so that a second run reads the cache instead of re-tokenizing.

The cache key covers everything that changes the ids: the tokenizer's content, the format config, the file's
content hash and this module's version. Training imports this; inference renders directly (no `datasets` on Kaggle).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from .folds import assign_folds
from .reading import read_battles
from .template import FormatConfig, Formatter
from .tokenizer import cache_root, file_digest

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 2: [CLS] starts encoder sequences; 3: soft column
NO_SOFT = [-1.0, -1.0, -1.0]  # the `soft` value of a row without soft label


def tokenizer_digest(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    extra = json.dumps([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id])
    return hashlib.sha256((blob + extra).encode("utf-8")).hexdigest()[:16]


def cache_key(csv_path: str | Path, tok, fmt: FormatConfig, num_folds: int, seed: int) -> str:
    parts = [CACHE_VERSION, file_digest(csv_path), tokenizer_digest(tok), fmt.to_dict(), num_folds, seed]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def build_records(battles, formatter: Formatter, folds, chunk: int = 512, progress: bool = True) -> dict[str, list]:
    """Column dict: id, input_ids, swap_input_ids (the A/B-swapped rendering), length, label (-1: none),
    soft ((pA, pB, pTie) of a soft-labelled row, NO_SOFT: none), fold."""
    from tqdm.auto import tqdm

    cols: dict[str, list] = {k: [] for k in ("id", "input_ids", "swap_input_ids", "length", "label", "soft", "fold")}
    bar = tqdm(total=len(battles), desc="tokenizing", unit="row", disable=not progress)
    for s in range(0, len(battles), chunk):
        part = battles[s : s + chunk]
        for i, (b, turns) in enumerate(zip(part, formatter.tokenize(part))):
            ids = formatter.render(turns)
            cols["id"].append(str(b.id))
            cols["input_ids"].append(ids)
            cols["swap_input_ids"].append(formatter.render(turns, swap=True))
            cols["length"].append(len(ids))
            cols["label"].append(-1 if b.label is None else int(b.label))
            cols["soft"].append(NO_SOFT if b.soft is None else [float(x) for x in b.soft])
            cols["fold"].append(int(folds[s + i]))
        bar.update(len(part))
    bar.close()
    return cols


def tokenized_dataset(csv_path: str | Path, tokenizer, fmt: FormatConfig, *, num_folds: int = 5, seed: int = 0,
                      cache_dir: str | Path | None = None, progress: bool = True):
    """A `datasets.Dataset` of the whole file (see `build_records` for columns), cached by content.

    The cache directory is written under a temporary name and renamed, so an interrupted run never leaves a
    half-written cache behind.
    """
    import datasets

    cache_dir = Path(cache_dir) if cache_dir else cache_root() / "datasets"
    key = cache_key(csv_path, tokenizer, fmt, num_folds, seed)
    target = cache_dir / key
    if (target / "dataset_info.json").exists():
        log.info("reading tokenized cache %s", target)
        return datasets.load_from_disk(str(target))
    battles = read_battles(csv_path)
    folds = assign_folds(battles, num_folds, seed)
    ds = datasets.Dataset.from_dict(build_records(battles, Formatter(tokenizer, fmt), folds, progress=progress))
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target))
