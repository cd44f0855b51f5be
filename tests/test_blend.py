"""`arena-data blend`: fitted weights (vs. a brute-force grid), the JSON line, applying weights, bad inputs."""
import json

import numpy as np
import pandas as pd
import pytest

from data.blend import blend, fit_weights
from data.scoring import log_loss
from tests.helpers.cli import read_sub, run_data, run_data_process, write_sub


def synthetic(n=400, seed=0):
    """Labels, a 'truth-ish' model (right class favoured, noisy) and pure noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    good = rng.dirichlet([1, 1, 1], size=n) * 0.5
    good[np.arange(n), y] += 0.5
    noise = rng.dirichlet([1, 1, 1], size=n)
    return y, good, noise


@pytest.fixture
def files(tmp_path, sample_dir):
    train = pd.read_csv(sample_dir / "train.csv")
    y = train[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy().argmax(1)
    rng = np.random.default_rng(1)
    n = len(y)
    good = rng.dirichlet([1, 1, 1], size=n) * 0.6
    good[np.arange(n), y] += 0.4
    other = 0.5 * good + 0.5 * rng.dirichlet([2, 2, 2], size=n)  # correlated, worse
    noise = rng.dirichlet([1, 1, 1], size=n)
    ids = train["id"].tolist()
    return {"labels": sample_dir / "train.csv", "ids": ids, "y": y,
            "good": write_sub(tmp_path / "good.csv", ids, good), "noise": write_sub(tmp_path / "noise.csv", ids, noise),
            "other": write_sub(tmp_path / "other.csv", ids[::-1], other[::-1]), "probs": (good, noise, other)}


def test_weights_go_to_the_informative_model_and_beat_the_best_single():
    y, good, noise = synthetic()
    fit = fit_weights([noise, good], y)
    assert fit.weights[1] > 0.9 and abs(fit.weights.sum() - 1) < 1e-12 and (fit.weights >= 0).all()
    best = min(log_loss(good, y), log_loss(noise, y))
    assert log_loss(blend([noise, good], fit.weights), y) <= best + 1e-12
    assert fit.gap <= 1e-10


@pytest.mark.parametrize("seed", range(3))
def test_two_file_weights_match_a_brute_force_grid(seed):
    y, good, noise = synthetic(seed=seed)
    mid = 0.6 * good + 0.4 * np.random.default_rng(seed + 10).dirichlet([1, 1, 1], size=len(y))  # interior optimum
    for a, b in ((good, mid), (good, noise)):
        grid = np.linspace(0, 1, 100001)
        losses = [log_loss(blend([a, b], [w, 1 - w]), y) for w in grid[::100]]  # coarse, then fine around it
        w0 = grid[::100][int(np.argmin(losses))]
        fine = grid[(grid >= w0 - 1e-3) & (grid <= w0 + 1e-3)]
        w_best = fine[int(np.argmin([log_loss(blend([a, b], [w, 1 - w]), y) for w in fine]))]
        assert abs(fit_weights([a, b], y).weights[0] - w_best) < 1e-3


def test_cli_fit_prints_one_json_object_last_in_the_given_order(files, capsys):
    code, out, err = run_data(capsys, "blend", "--labels", files["labels"], "--predictions", files["noise"],
                              files["good"], files["other"])
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert set(res) >= {"weights", "log_loss", "single", "temperature"}
    good, noise, other = files["probs"]
    y = files["y"]
    assert res["single"] == pytest.approx([log_loss(p, y) for p in (noise, good, other)], abs=1e-6)
    assert res["weights"][1] == max(res["weights"]) and abs(sum(res["weights"]) - 1) < 1e-5
    assert res["log_loss"] <= min(res["single"]) + 1e-9
    assert res["temperature"] == 1.0
    # the printed weights, applied: the same log loss (what arena-predict --weights / the kernel's WEIGHTS do)
    assert log_loss(blend([noise, good, other], res["weights"]), y) == pytest.approx(res["log_loss"], abs=1e-5)


def test_cli_fit_counts_unlabelled_ids_it_ignores(files, tmp_path, capsys):
    good = files["probs"][0]
    more = write_sub(tmp_path / "more.csv", [*files["ids"], 77, 78], np.vstack([good, good[:2]]))
    code, out, err = run_data(capsys, "blend", "--labels", files["labels"], "--predictions", files["good"], more)
    assert code == 0, err
    assert f"{more}: log loss" in out and "(2 unlabelled ids ignored)" in out
    assert json.loads(out.strip().splitlines()[-1])["rows"] == len(files["ids"])


def test_cli_fit_temperature_never_hurts(files, capsys):
    code, out, _ = run_data(capsys, "blend", "--labels", files["labels"], "--predictions", files["good"],
                            files["noise"], "--fit-temperature")
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and res["log_loss"] <= res["log_loss_no_temperature"] + 1e-12
    assert res["temperature"] != 1.0  # these synthetic probabilities are miscalibrated


def test_cli_apply_writes_the_weighted_mean_in_first_file_order(files, tmp_path, capsys):
    out = tmp_path / "blend.csv"
    code, _, err = run_data(capsys, "blend", "--predictions", files["good"], files["other"], "--weights", "3,1",
                            "--out", out)
    assert code == 0, err
    ids, probs = read_sub(out)
    good, _, other = files["probs"]
    assert ids == [str(i) for i in files["ids"]]
    assert np.abs(probs - (0.75 * good + 0.25 * other)).max() < 1e-12


def test_cli_apply_with_temperature(files, tmp_path, capsys):
    out = tmp_path / "blend.csv"
    code, _, _ = run_data(capsys, "blend", "--predictions", files["good"], "--weights", "1", "--temperature", "2",
                          "--out", out)
    good = files["probs"][0]
    expect = np.sqrt(good) / np.sqrt(good).sum(axis=1, keepdims=True)
    assert code == 0 and np.abs(read_sub(out)[1] - expect).max() < 1e-12


@pytest.mark.parametrize("args, code, expect", [
    (["--weights", "1,2,3", "--out", "OUT"], 2, "--weights has 3 values for 2"),
    (["--weights", "1,x", "--out", "OUT"], 2, "comma-separated numbers"),
    (["--weights", "1,-1", "--out", "OUT"], 2, "non-negative"),
    (["--weights", "1,1", "--out", "OUT", "--temperature", "0"], 2, "--temperature must be positive"),
    ([], 2, "give --labels"),
    (["--weights", "1,1"], 2, "--weights needs --out"),
    (["--labels", "LABELS", "--out", "OUT"], 2, "--out needs --weights"),
])
def test_cli_usage_errors(files, tmp_path, capsys, args, code, expect):
    args = [{"OUT": tmp_path / "out.csv", "LABELS": files["labels"]}.get(a, a) for a in args]
    got, out, err = run_data(capsys, "blend", "--predictions", files["good"], files["noise"], *args)
    assert got == code and expect in err, err
    assert not (tmp_path / "out.csv").exists()


def test_cli_refuses_missing_ids_naming_file_and_ids(files, tmp_path, capsys):
    good = files["probs"][0]
    short = write_sub(tmp_path / "short.csv", files["ids"][:-3], good[:-3])
    code, _, err = run_data(capsys, "blend", "--labels", files["labels"], "--predictions", files["good"], short)
    assert code == 1
    assert f"{short}: column id: 3 id(s) of {files['labels']} missing" in err and str(files["ids"][-1]) in err
    code, _, err = run_data(capsys, "blend", "--predictions", files["good"], short, "--weights", "1,1",
                            "--out", tmp_path / "x.csv")
    assert code == 1 and f"{short}: column id: 3 id(s) of {files['good']} missing" in err
    assert not (tmp_path / "x.csv").exists()


def test_cli_refuses_rows_not_summing_to_one_and_unknown_formats(files, tmp_path, capsys):
    good = files["probs"][0].copy()
    good[5] *= 2
    bad = write_sub(tmp_path / "bad.csv", files["ids"], good)
    r = run_data_process("blend", "--labels", files["labels"], "--predictions", files["good"], bad)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{bad}: line 7: id {files['ids'][5]}: column winner_model_a+winner_model_b+winner_tie: probabilities sum to 2" \
        in r.stderr
    npz = tmp_path / "preds.npz"
    np.savez(npz, probs=good)
    r = run_data_process("blend", "--labels", files["labels"], "--predictions", files["good"], npz)
    assert r.returncode == 1 and "Traceback" not in r.stderr and f"{npz}: cannot read as CSV" in r.stderr, r.stderr
    wrong = write_sub(tmp_path / "wrong.csv", files["ids"], good, header="id,a,b,c")
    for path, expect in ((wrong, "header must be id,winner_model_a"), (tmp_path / "nope.csv", "cannot read")):
        code, _, err = run_data(capsys, "blend", "--labels", files["labels"], "--predictions", files["good"], path)
        assert code == 1 and f"{path}: " in err and expect in err, err


def test_cli_refuses_soft_labels_as_the_fitting_target(files, tmp_path, capsys):
    """Weights are fitted to true classes: a pseudo-labelled (soft) labels file is refused, naming file, id, column."""
    train = pd.read_csv(files["labels"])
    cols = ["winner_model_a", "winner_model_b", "winner_tie"]
    train[cols] = train[cols].astype(float)
    train.loc[3, cols] = [0.5, 0.3, 0.2]
    soft = tmp_path / "soft.csv"
    train.to_csv(soft, index=False)
    code, _, err = run_data(capsys, "blend", "--labels", soft, "--predictions", files["good"], files["noise"])
    assert code == 1 and "Traceback" not in err
    assert f"{soft}: id {train.loc[3, 'id']}: column winner_model_a: no hard label" in err, err
