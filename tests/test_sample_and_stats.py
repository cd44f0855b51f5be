"""`arena-data sample` output is valid and round-trips; `stats` prints percentiles."""
import json
import subprocess
import sys

import pandas as pd

from data.reading import read_battles
from tests.conftest import LLAMA3_TOKENIZER, REAL_TRAIN, ROOT, needs_llama3, needs_shared


def _run(*args):
    return subprocess.run([sys.executable, "-m", "data", *args], capture_output=True, text=True, cwd=ROOT)


def test_sample_is_valid_and_kaggle_shaped(tmp_path):
    r = _run("sample", "--out", str(tmp_path), "--rows", "300", "--seed", "3")
    assert r.returncode == 0, r.stderr
    for name in ("train.csv", "test.csv"):
        v = _run("validate", str(tmp_path / name))
        assert v.returncode == 0, v.stdout
    train = pd.read_csv(tmp_path / "train.csv")
    assert list(train.columns) == ["id", "model_a", "model_b", "prompt", "response_a", "response_b",
                                   "winner_model_a", "winner_model_b", "winner_tie"]
    test = pd.read_csv(tmp_path / "test.csv")
    assert list(test.columns) == ["id", "prompt", "response_a", "response_b"]
    sub = pd.read_csv(tmp_path / "sample_submission.csv")
    assert list(sub.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert list(sub["id"]) == list(test["id"])
    # round trip through the loader: same texts as the raw JSON (nulls become "")
    battles = {b.id: b for b in read_battles(tmp_path / "train.csv")}
    assert len(battles) == 300
    for row in train.itertuples():
        b = battles[row.id]
        assert b.response_a == tuple("" if t is None else t for t in json.loads(row.response_a))
        assert b.label == [row.winner_model_a, row.winner_model_b, row.winner_tie].index(1)
    # the real data's quirks are present
    assert any(b.n_turns > 1 for b in battles.values())
    assert any("" in b.response_a + b.response_b for b in battles.values())
    assert any(any(ord(c) > 0x2000 for c in "".join(b.response_a)) for b in battles.values())
    counts = pd.Series([b.label for b in battles.values()]).value_counts(normalize=True)
    assert all(0.2 < counts[k] < 0.45 for k in (0, 1, 2))


def test_sample_is_deterministic(tmp_path):
    _run("sample", "--out", str(tmp_path / "a"), "--rows", "50")
    _run("sample", "--out", str(tmp_path / "b"), "--rows", "50")
    assert (tmp_path / "a" / "train.csv").read_bytes() == (tmp_path / "b" / "train.csv").read_bytes()


def test_sample_has_surrogates_at_scale(tmp_path):
    from data.synthetic import write_sample

    write_sample(tmp_path, rows=1000, seed=1)
    assert any("\ufffd" in "".join(b.prompt) for b in read_battles(tmp_path / "train.csv"))


def test_stats_without_tokenizer(sample_dir):
    r = _run("stats", str(sample_dir / "train.csv"))
    assert r.returncode == 0 and "400 rows" in r.stdout and "prior log loss" in r.stdout


@needs_shared
@needs_llama3
def test_stats_real_sample_with_llama3():
    r = _run("stats", str(REAL_TRAIN), "--tokenizer", str(LLAMA3_TOKENIZER), "--max-length", "2048")
    assert r.returncode == 0, r.stderr
    assert "999 rows" in r.stdout and "p99" in r.stdout
    total = next(line for line in r.stdout.splitlines() if line.strip().startswith("total")).split()
    p50, p99 = int(total[1]), int(total[4])
    assert 400 < p50 < 700 and 2500 < p99 < 5000  # the measured ~520 / ~3600
    assert "truncated at max_length 2048" in r.stdout
