"""k folds that never split one prompt across folds, stratified by label (greedy, as StratifiedGroupKFold)."""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from .reading import Battle


def prompt_key(b: Battle) -> str:
    """Group key: the normalised prompt turns. Arena repeats prompts across battles; they must not leak."""
    text = "\x1f".join(" ".join(t.lower().split()) for t in b.prompt)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def assign_folds(battles: Sequence[Battle], k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index per battle. Groups (same prompt) go whole to the fold whose label mix stays closest to the global one.

    Soft-labelled battles (no hard label) stratify by the argmax of their probabilities; unlabelled battles count
    as one class of their own, so the function also works on test files.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    keys = [prompt_key(b) for b in battles]
    labels = np.array([b.label if b.label is not None else 3 if b.soft is None else int(np.argmax(b.soft))
                       for b in battles])
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    rng = np.random.default_rng(seed)
    names = list(groups)
    rng.shuffle(names)
    # Big groups first (hardest to place), shuffled ties; then greedy: the fold that minimises label-share spread.
    names.sort(key=lambda g: -len(groups[g]))
    counts = np.zeros((k, 4))
    total = np.bincount(labels, minlength=4).astype(float)
    fold = np.empty(len(battles), dtype=np.int64)
    for g in names:
        idx = groups[g]
        add = np.bincount(labels[idx], minlength=4)
        best, best_cost = 0, None
        for f in range(k):
            trial = counts.copy()
            trial[f] += add
            cost = np.std(trial / np.maximum(total, 1), axis=0).sum() + 1e-6 * trial[f].sum()
            if best_cost is None or cost < best_cost:
                best, best_cost = f, cost
        counts[best] += add
        fold[idx] = best
    return fold
