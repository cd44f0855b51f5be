"""`arena-data pseudo-label`: soft-labelled training file, confidence bar, exclusion (either A/B order), bad inputs."""
import csv

import numpy as np
import pytest

from data.reading import LABEL_COLUMNS, read_battles, validate
from tests.conftest import REAL_TRAIN, needs_shared
from tests.helpers.cli import run_data, run_data_process, write_sub


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def _write_rows(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def case(sample_dir, tmp_path):
    data = sample_dir / "test.csv"
    header, rows = _rows(data)
    probs = np.random.default_rng(0).dirichlet([1, 1, 1], size=len(rows))
    preds = write_sub(tmp_path / "probs.csv", [r["id"] for r in rows], probs)
    # an excluded file holding row 0 in the other A/B order and row 1 with other case and spacing (other ids)
    ex = [{**rows[0], "id": "9", "response_a": rows[0]["response_b"], "response_b": rows[0]["response_a"]},
          {**rows[1], "id": "10", "prompt": rows[1]["prompt"].upper().replace(" ", "   ")}]
    exclude = _write_rows(tmp_path / "seen.csv", header, ex)
    return {"data": data, "rows": rows, "probs": probs, "preds": preds, "exclude": exclude}


def test_writes_soft_labels_drops_unsure_and_excluded_rows_and_prints_counts(case, tmp_path, capsys):
    out = tmp_path / "labelled.csv"
    p = case["probs"]
    p[[0, 1]] = [0.8, 0.1, 0.1]  # confident, but excluded
    write_sub(case["preds"], [r["id"] for r in case["rows"]], p)
    code, stdout, err = run_data(capsys, "pseudo-label", "--data", case["data"], "--predictions", case["preds"],
                                 "--out", out, "--min-confidence", "0.5", "--exclude", case["exclude"])
    assert code == 0, err
    confident = p.max(axis=1) >= 0.5
    keep = confident.copy()
    keep[[0, 1]] = False
    n = len(p)
    assert f"{n} rows read" in stdout and f"dropped {int((~confident).sum())} below --min-confidence 0.5" in stdout
    assert "dropped 2 also in" in stdout and f"wrote {out}: {int(keep.sum())} rows" in stdout
    header, rows = _rows(out)
    assert header == ["id", "prompt", "response_a", "response_b", *LABEL_COLUMNS]
    kept = [r for r, k in zip(case["rows"], keep) if k]
    assert [{c: r[c] for c in header[:4]} for r in rows] == [{c: r[c] for c in header[:4]} for r in kept]  # exact text
    labels = np.array([[float(r[c]) for c in LABEL_COLUMNS] for r in rows])
    assert np.abs(labels - p[keep]).max() < 1e-12
    assert [b.prompt for b in read_battles(out, labels=False)] == [b.prompt for b in read_battles(case["data"])
                                                                   if b.id in {int(r["id"]) for r in kept}]


def test_hard_labels_give_a_file_the_strict_validator_accepts(sample_dir, tmp_path, capsys):
    """Predictions that are one-hot give a plain 0/1 training file (model_a/model_b kept when the data has them)."""
    data = sample_dir / "train.csv"
    header, rows = _rows(data)
    onehot = np.eye(3)[np.arange(len(rows)) % 3]
    preds = write_sub(tmp_path / "p.csv", [r["id"] for r in rows], onehot)
    out = tmp_path / "labelled.csv"
    code, _, err = run_data(capsys, "pseudo-label", "--data", data, "--predictions", preds, "--out", out)
    assert code == 0, err
    assert _rows(out)[0] == ["id", "model_a", "model_b", "prompt", "response_a", "response_b", *LABEL_COLUMNS]
    assert validate(out) == (len(rows), [])
    assert [b.label for b in read_battles(out)] == list(np.arange(len(rows)) % 3)


@needs_shared
def test_real_texts_round_trip_byte_for_byte(tmp_path, capsys):
    header, rows = _rows(REAL_TRAIN)
    preds = write_sub(tmp_path / "p.csv", [r["id"] for r in rows], np.full((len(rows), 3), 1 / 3))
    out = tmp_path / "labelled.csv"
    code, _, err = run_data(capsys, "pseudo-label", "--data", REAL_TRAIN, "--predictions", preds, "--out", out)
    assert code == 0, err
    got = _rows(out)[1]
    cols = ["id", "model_a", "model_b", "prompt", "response_a", "response_b"]
    assert [[r[c] for c in cols] for r in got] == [[r[c] for c in cols] for r in rows]
    assert [(b.prompt, b.response_a, b.response_b) for b in read_battles(out, labels=False)] == \
        [(b.prompt, b.response_a, b.response_b) for b in read_battles(REAL_TRAIN)]


def test_refuses_predictions_missing_ids_or_not_summing_to_one(case, tmp_path, capsys):
    ids = [r["id"] for r in case["rows"]]
    short = write_sub(tmp_path / "short.csv", ids[2:], case["probs"][2:])
    out = tmp_path / "labelled.csv"
    code, _, err = run_data(capsys, "pseudo-label", "--data", case["data"], "--predictions", short, "--out", out)
    assert code == 1 and f"{short}: column id: 2 id(s) of the data file have no prediction, e.g. ['{ids[0]}'" in err
    p = case["probs"].copy()
    p[4] = [0.9, 0.9, 0.9]
    bad = write_sub(tmp_path / "bad.csv", ids, p)
    r = run_data_process("pseudo-label", "--data", case["data"], "--predictions", bad, "--out", out)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{bad}: line 6: id {ids[4]}: column winner_model_a+winner_model_b+winner_tie: probabilities sum to 2.7" in r.stderr
    assert not out.exists()


def test_refuses_bad_data_and_exclude_files_and_options(case, tmp_path, capsys):
    out = tmp_path / "labelled.csv"
    header, rows = _rows(case["data"])
    nocol = _write_rows(tmp_path / "nocol.csv", [h for h in header if h != "response_b"],
                        [{k: v for k, v in r.items() if k != "response_b"} for r in rows])
    code, _, err = run_data(capsys, "pseudo-label", "--data", nocol, "--predictions", case["preds"], "--out", out)
    assert code == 1 and f"{nocol}: column response_b: missing column" in err
    broken = _write_rows(tmp_path / "broken.csv", header, [{**rows[0], "prompt": "[not json"}] + rows[1:])
    code, _, err = run_data(capsys, "pseudo-label", "--data", case["data"], "--predictions", case["preds"],
                            "--out", out, "--exclude", broken)
    assert code == 1 and f"{broken}: line 2: id {rows[0]['id']}: column prompt: malformed JSON" in err, err
    code, _, err = run_data(capsys, "pseudo-label", "--data", case["data"], "--predictions", case["preds"],
                            "--out", out, "--exclude", tmp_path / "nope.csv")
    assert code == 1 and f"{tmp_path / 'nope.csv'}: cannot read file" in err
    code, _, err = run_data(capsys, "pseudo-label", "--data", case["data"], "--predictions", case["preds"],
                            "--out", out, "--min-confidence", "1.5")
    assert code == 2 and "--min-confidence must be in [0, 1]" in err
    code, _, err = run_data(capsys, "pseudo-label", "--data", case["data"], "--predictions", case["preds"],
                            "--out", out, "--min-confidence", "1")
    assert code == 1 and "no row is left to write" in err
    assert not out.exists()
