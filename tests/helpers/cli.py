"""Run `arena-data` in process (fast) or as a subprocess (the real entry point) and collect exit code and output."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from data.reading import LABEL_COLUMNS
from tests.conftest import ROOT


def run_data(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `arena-data ARGS` in this process; an uncaught exception fails the test."""
    from data.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_data_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def write_sub(path: Path, ids, probs, header: str = ",".join(("id", *LABEL_COLUMNS))) -> Path:
    """A submission-format file with the given rows (no checks: tests write bad ones on purpose)."""
    rows = "\n".join(f"{i},{a!r},{b!r},{c!r}" for i, (a, b, c) in zip(ids, np.asarray(probs, dtype=float).tolist()))
    Path(path).write_text(header + "\n" + rows + ("\n" if rows else ""))
    return Path(path)


def read_sub(path: Path) -> tuple[list[str], np.ndarray]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", *LABEL_COLUMNS]
    return [r[0] for r in rows[1:]], np.array([[float(x) for x in r[1:]] for r in rows[1:]]).reshape(-1, 3)
