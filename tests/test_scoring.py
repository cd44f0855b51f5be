"""The competition metric and the `score` command."""
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from data.reading import DataError
from data.scoring import log_loss, read_submission, score_submission
from tests.conftest import ROOT


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n = 500
    p = rng.dirichlet([0.3, 0.3, 0.3], size=n)  # peaked rows, some probabilities near 0
    p[:5] = [1.0, 0.0, 0.0]  # exact zeros and ones exercise the clipping
    y = rng.integers(0, 3, size=n)
    assert abs(log_loss(p, y) - sk_log_loss(y, p, labels=[0, 1, 2])) < 1e-9


def test_uniform_is_log3():
    assert abs(log_loss(np.full((10, 3), 1 / 3), np.arange(10) % 3) - math.log(3)) < 1e-12


def _sub(path, ids, probs, header="id,winner_model_a,winner_model_b,winner_tie"):
    rows = "\n".join(f"{i},{a},{b},{c}" for i, (a, b, c) in zip(ids, probs))
    path.write_text(header + "\n" + rows + "\n")
    return path


def test_score_cli_prints_uniform(tmp_path, sample_dir):
    ids = pd.read_csv(sample_dir / "train.csv")["id"]
    sub = _sub(tmp_path / "u.csv", ids, [(1 / 3, 1 / 3, 1 / 3)] * len(ids))
    r = subprocess.run([sys.executable, "-m", "data", "score", "--submission", str(sub), "--labels",
                        str(sample_dir / "train.csv")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "log_loss 1.0986" in r.stdout


def test_score_matches_metric_on_file(tmp_path, sample_dir):
    df = pd.read_csv(sample_dir / "train.csv")
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], size=len(df))
    sub = _sub(tmp_path / "s.csv", df["id"], p)
    y = df[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy().argmax(1)
    assert abs(score_submission(sub, sample_dir / "train.csv")["log_loss"] - sk_log_loss(y, p)) < 1e-9


@pytest.mark.parametrize(
    "header, probs, ids, msg",
    [
        ("id,a,b,c", [(0.2, 0.3, 0.5)], None, "header must be"),
        (None, [(0.2, float("nan"), 0.8)], None, "finite"),
        (None, [(0.2, 0.3, 0.5)], "dup", "more than once"),
        (None, [(0.2, 0.3, 0.5)], "missing", "missing"),
    ],
)
def test_malformed_submissions_are_rejected(tmp_path, sample_dir, header, probs, ids, msg):
    all_ids = list(pd.read_csv(sample_dir / "train.csv")["id"])
    use = all_ids
    if ids == "dup":
        use = all_ids + all_ids[:1]
    elif ids == "missing":
        use = all_ids[:-3]
    kw = {"header": header} if header else {}
    sub = _sub(tmp_path / "bad.csv", use, probs * len(use), **kw)
    with pytest.raises(DataError, match=msg) as e:
        score_submission(sub, sample_dir / "train.csv")
    assert "bad.csv" in str(e.value)
    r = subprocess.run([sys.executable, "-m", "data", "score", "--submission", str(sub), "--labels",
                        str(sample_dir / "train.csv")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr and msg in r.stderr


def test_read_submission_indexes_by_id(tmp_path):
    df = read_submission(_sub(tmp_path / "s.csv", [5, 6], [(0.1, 0.2, 0.7), (0.3, 0.3, 0.4)]))
    assert list(df.index) == [5, 6] and df.loc[6, "winner_tie"] == 0.4
