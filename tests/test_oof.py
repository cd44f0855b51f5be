"""`arena-data oof`: k fold runs' validation predictions joined into one out-of-fold file, and what it refuses."""
import json
import shutil

import numpy as np
import pytest
import yaml

from data.folds import assign_folds
from data.reading import read_battles
from tests.helpers.cli import read_sub, run_data, run_data_process

K = 3
T_TTA, T_ONE = 1.3, 1.1


def _softmax(z, t):
    e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def make_run(root, name, train_csv, fold, battles, folds, seed=0, **data):
    """A run dir as arena-train leaves it: config.yaml, val_predictions.npz (fold `fold`), final/arena.json."""
    d = root / name
    (d / "final").mkdir(parents=True)
    cfg = {"data": {"train_csv": str(train_csv), "valid_csv": None, "valid_fold": fold, "num_folds": K,
                    "fold_seed": 0, **data}, "output_dir": str(d)}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "final" / "arena.json").write_text(json.dumps({"temperature": T_TTA, "temperature_no_tta": T_ONE}))
    idx = np.flatnonzero(folds == fold)
    rng = np.random.default_rng(seed + fold)
    logits, swap = rng.normal(size=(len(idx), 3)), rng.normal(size=(len(idx), 3))
    np.savez(d / "val_predictions.npz", ids=np.array([str(battles[i].id) for i in idx]), logits=logits,
             logits_swap=swap, probs=_softmax(logits, 1.0), labels=np.array([battles[i].label for i in idx]))
    expect = 0.5 * (_softmax(logits, T_TTA) + _softmax(swap, T_TTA)[:, [1, 0, 2]])  # what arena-predict serves
    return d, idx, expect


@pytest.fixture
def runs(sample_dir, tmp_path):
    train = sample_dir / "train.csv"
    battles = read_battles(train)
    folds = assign_folds(battles, K, 0)
    made = [make_run(tmp_path, f"fold{k}", train, k, battles, folds) for k in range(K)]
    expect = np.zeros((len(battles), 3))
    for _, idx, p in made:
        expect[idx] = p
    return {"train": train, "battles": battles, "folds": folds, "dirs": [m[0] for m in made], "expect": expect,
            "root": tmp_path}


def test_every_training_row_once_in_training_order_as_served(runs, tmp_path, capsys):
    out = tmp_path / "oof.csv"
    d0, d1, d2 = runs["dirs"]
    code, stdout, err = run_data(capsys, "oof", d2, d0, d1, "--out", out)
    assert code == 0, err
    ids, probs = read_sub(out)
    assert ids == [str(b.id) for b in runs["battles"]]
    assert np.abs(probs - runs["expect"]).max() < 1e-12
    n = len(ids)
    assert f"wrote {out}: {n} rows of {runs['train']}" in stdout and "log loss" in stdout
    for k, d in enumerate(runs["dirs"]):
        assert f"{d}: fold {k} of {K}, {int((runs['folds'] == k).sum())} rows" in stdout


def test_train_override_for_runs_trained_elsewhere(runs, tmp_path, capsys):
    moved = tmp_path / "moved.csv"
    shutil.copy(runs["train"], moved)
    for d in runs["dirs"]:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["data"]["train_csv"] = "/elsewhere/train.csv"
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_data(capsys, "oof", *runs["dirs"], "--out", tmp_path / "oof.csv")
    assert code == 1 and "column data.train_csv: training file '/elsewhere/train.csv' not found" in err
    code, _, err = run_data(capsys, "oof", *runs["dirs"], "--out", tmp_path / "oof.csv", "--train", moved)
    assert code == 0, err


def test_refuses_overlapping_folds_naming_id_and_both_runs(runs, capsys):
    again, idx, _ = make_run(runs["root"], "fold1-again", runs["train"], 1, runs["battles"], runs["folds"], seed=5)
    out = runs["root"] / "oof.csv"
    code, _, err = run_data(capsys, "oof", *runs["dirs"], again, "--out", out)
    first = runs["battles"][idx[0]].id
    assert code == 1 and f"{again}: id {first}: column id: id also predicted by {runs['dirs'][1]}" in err, err
    assert not out.exists()


def test_refuses_missing_ids_naming_the_fold_no_run_held_out(runs, capsys):
    out = runs["root"] / "oof.csv"
    r = run_data_process("oof", runs["dirs"][0], runs["dirs"][2], "--out", out)
    missing = [str(b.id) for b, f in zip(runs["battles"], runs["folds"]) if f == 1]
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{runs['train']}: column id: {len(missing)} training id(s) have no out-of-fold prediction, " \
           f"e.g. ['{missing[0]}'" in r.stderr and "no run for fold(s) [1]" in r.stderr
    assert not out.exists()


def test_refuses_runs_of_different_splits_and_non_fold_runs(runs, capsys):
    d0, d1, d2 = runs["dirs"]
    out = runs["root"] / "oof.csv"
    cfg = yaml.safe_load((d1 / "config.yaml").read_text())
    (d1 / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": {**cfg["data"], "fold_seed": 7}}))
    code, _, err = run_data(capsys, "oof", d0, d1, d2, "--out", out)
    assert code == 1 and f"{d1 / 'config.yaml'}: column data.fold_seed: 7 differs from 0 in {d0}" in err
    (d1 / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": {**cfg["data"], "valid_csv": "valid.csv"}}))
    code, _, err = run_data(capsys, "oof", d0, d1, d2, "--out", out)
    assert code == 1 and f"{d1 / 'config.yaml'}: column data.valid_csv: data.valid_csv=valid.csv" in err
    (d1 / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": {**cfg["data"], "valid_fold": None}}))
    code, _, err = run_data(capsys, "oof", d0, d1, d2, "--out", out)
    assert code == 1 and "column data.valid_fold: data.valid_fold is null" in err


def test_refuses_run_dirs_without_predictions_or_ids(runs, capsys):
    d0, d1, d2 = runs["dirs"]
    out = runs["root"] / "oof.csv"
    code, _, err = run_data(capsys, "oof", d0, runs["root"] / "nope", "--out", out)
    assert code == 1 and f"{runs['root'] / 'nope'}: not a directory" in err
    with np.load(d1 / "val_predictions.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "ids"}
    np.savez(d1 / "val_predictions.npz", **arrays)
    code, _, err = run_data(capsys, "oof", d0, d1, d2, "--out", out)
    assert code == 1 and f"{d1 / 'val_predictions.npz'}: missing array(s) ['ids']" in err
    (d1 / "val_predictions.npz").unlink()
    code, _, err = run_data(capsys, "oof", d0, d1, d2, "--out", out)
    assert code == 1 and f"{d1 / 'val_predictions.npz'}: missing: the validation predictions" in err
    (d2 / "val_predictions.npz").write_text("id,winner_model_a\n")  # not an npz
    code, _, err = run_data(capsys, "oof", d0, d2, "--out", out)
    assert code == 1 and f"{d2 / 'val_predictions.npz'}: not a NumPy .npz file" in err
    assert not out.exists()
