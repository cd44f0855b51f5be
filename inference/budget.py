"""Pure time-budget decisions: parse a budget, project the finish, pick the least degraded mode that fits.

A Kaggle submission that is late scores nothing, so quality is traded for time in a fixed order. Test-time
augmentation (the A/B-swapped view) is a second pass: every row first gets one view, then the swapped views run
most uncertain row first (highest entropy of the first view), so (1) the swaps that help least are dropped first;
then, for first views not yet started, (2) max_length is shortened in steps, (3) what is still left when the
deadline comes gets the training prior. The projection is re-done as throughput is measured; the mode only ever
gets cheaper, so a row's treatment never oscillates.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

SHORTEN_STEPS = (0.75, 0.5, 0.375, 0.25)  # fractions of max_length tried once the swaps are dropped
MIN_SHORT_LENGTH = 128


@dataclass(frozen=True)
class Mode:
    """How the remaining first views are scored: at a fraction of each model's max_length (TTA is a second pass)."""

    fraction: float = 1.0

    def length(self, max_length: int, floor: int = MIN_SHORT_LENGTH) -> int:
        """The max_length this mode uses for a model whose full max_length is given (never below `floor`)."""
        if self.fraction >= 1.0:
            return max_length
        return max(min(floor, max_length), int(max_length * self.fraction))

    def describe(self, max_length: int | None = None) -> str:
        if max_length is None:
            length = "full max_length" if self.fraction >= 1.0 else f"{self.fraction:g} x max_length"
        else:
            length = f"max_length {self.length(max_length)}"
        return length


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from '8h30m', '90m', '45s', '1h', '3600' or '1.5h'; None/'none'/'0' mean no limit.

    Raises ValueError naming the bad text.
    """
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text) if text > 0 else None
    s = str(text).strip().lower().replace(" ", "")
    if s in ("", "none", "inf", "0"):
        return None
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise ValueError(f"cannot parse time budget {text!r}: use e.g. 8h30m, 90m, 45s or seconds")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{seconds:.1f}s")


def ladder() -> list[Mode]:
    """Modes from best to cheapest: full max_length, then shorter max_lengths."""
    return [Mode(), *(Mode(f) for f in SHORTEN_STEPS)]


TTA_CHOICES = "on, auto, off, or a fraction in (0, 1]"


def parse_tta(text: str | bool | float) -> str | float:
    """'on' | 'auto' | 'off' | a fraction in (0, 1] (at most that share of rows gets the swapped view).

    True/False (the old --tta/--no-tta) mean 'on'/'off'; '1' is 'on', '0' is 'off'. Raises ValueError naming the text.
    """
    if isinstance(text, bool):
        return "on" if text else "off"
    s = str(text).strip().lower()
    if s in ("on", "auto", "off"):
        return s
    try:
        f = float(s)
    except ValueError:
        raise ValueError(f"--tta {text!r}: use {TTA_CHOICES}") from None
    if not 0.0 <= f <= 1.0 or math.isnan(f):
        raise ValueError(f"--tta {text!r}: a fraction must be between 0 and 1 (or use {TTA_CHOICES})")
    return "off" if f == 0.0 else "on" if f == 1.0 else f


def swap_cap(tta: str | float, rows: int) -> int:
    """How many rows the mode asks to get both views: all ('on', and 'auto' as far as the budget allows), none
    ('off'), ceil(fraction x rows) for a fraction."""
    if tta == "off":
        return 0
    if isinstance(tta, float):
        return min(rows, math.ceil(tta * rows - 1e-9))
    return rows


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of (rows, 3) probabilities."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return -np.sum(p * np.log(p), axis=-1)


def swap_order(probs: np.ndarray) -> np.ndarray:
    """Row indices, most uncertain first (highest entropy of the first view; ties by row index): the order in which
    swapped views are worth running. The WSDM Cup winners swapped only the most uncertain third."""
    return np.lexsort((np.arange(len(probs)), -entropy(probs)))


def reserve_seconds(budget: float) -> float:
    """Time kept back at the end to stop workers and write the file: 2% of the budget, between 2 s and 2 min."""
    return max(2.0, min(120.0, 0.02 * budget))


def choose_mode(
    modes: Sequence[Mode], current: int, remaining_cost: Callable[[Mode], float], rate: float | None,
    time_left: float, extra_seconds: float = 0.0,
) -> tuple[int, float | None]:
    """Index of the least degraded mode (never better than `current`) whose projection fits, and that projection.

    remaining_cost(mode): cost units of all unfinished work under that mode; rate: cost units per second of all
    workers together (None until measured: keep the current mode); extra_seconds: known fixed costs still ahead
    (e.g. loading the next model of an ensemble). When nothing fits, the cheapest mode is returned: it runs until
    the deadline and the rest gets the prior.
    """
    if rate is None or rate <= 0:
        return current, None
    projection = None
    for i in range(current, len(modes)):
        projection = remaining_cost(modes[i]) / rate + extra_seconds
        if projection <= time_left:
            return i, projection
    return len(modes) - 1, projection


@dataclass
class Throughput:
    """Cost units per second of one worker, from the batches it finished (its own compute time, not waiting)."""

    cost: float = 0.0
    seconds: float = 0.0
    batches: int = 0

    def add(self, cost: float, seconds: float) -> None:
        self.cost += cost
        self.seconds += max(seconds, 1e-6)
        self.batches += 1

    @property
    def rate(self) -> float | None:
        return self.cost / self.seconds if self.batches else None


def combined_rate(per_worker: Sequence[Throughput], alive: int) -> float | None:
    """Rate of `alive` workers together, assuming each runs as fast as the measured average worker."""
    measured = [t for t in per_worker if t.batches]
    if not measured or alive <= 0:
        return None
    cost = sum(t.cost for t in measured)
    seconds = sum(t.seconds for t in measured)
    return alive * cost / seconds
