"""Atomic file writes: a reader, or a crash mid-write, never sees half a file (submissions, CSVs, run state)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; renamed over `path` when the block ends without an error,
    removed when it raises. Same directory, so the rename is atomic; pid in the name, so two writers never share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # nothing left after a successful rename


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8, newlines as given), synced to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
