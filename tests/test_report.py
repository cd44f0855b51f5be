"""Run report and temperature scaling: the numbers on hand-checked inputs, the fit on data with a planted
calibration error, and the written report (valid PNGs, markdown with the numbers, runs without evaluation)."""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from data.scoring import log_loss
from inference.submission import tta_average
from tests.conftest import ROOT
from training import report
from training.report import (
    T_MAX,
    T_MIN,
    confusion_matrix,
    expected_calibration_error,
    fit_temperature,
    prior_log_loss,
    read_metrics,
    read_predictions,
    reliability_bins,
    row_shares,
    smooth,
    softmax,
    write_report,
)


def calibrated_sample(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated at T = 1 by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 3)) * 1.5 + np.array([0.2, 0.2, -0.2])
    p = softmax(logits)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return logits, labels


# --- temperature -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_fit_temperature_recovers_planted_scale(scale):
    logits, labels = calibrated_sample(6000)
    t = fit_temperature(logits * scale, labels)
    assert abs(t - scale) / scale < 0.08, t
    before = log_loss(softmax(logits * scale), labels)
    after = log_loss(softmax(logits * scale, t), labels)
    assert after < before - 0.01
    # Dividing by T undoes the scale: the fitted loss is close to the loss of the calibrated logits.
    assert after == pytest.approx(log_loss(softmax(logits), labels), abs=0.005)


def test_fit_temperature_is_the_minimum_of_a_fine_grid():
    logits, labels = calibrated_sample(2000, seed=1)
    logits = logits * 2.2
    t = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(math.log(T_MIN), math.log(T_MAX), 4001))
    losses = [log_loss(softmax(logits, g), labels) for g in grid]
    assert log_loss(softmax(logits, t), labels) <= min(losses) + 1e-7
    assert abs(math.log(t) - math.log(grid[int(np.argmin(losses))])) < 0.01


def test_fit_temperature_calibrated_input_stays_near_one():
    logits, labels = calibrated_sample(6000, seed=2)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.08)


def test_fit_temperature_degenerate_inputs_return_one():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    assert fit_temperature(np.ones((5, 3)) * 2.0, np.array([0, 1, 2, 0, 1])) == 1.0  # constant rows: T has no effect
    bad = np.array([[1.0, np.nan, 0.0], [0.0, 1.0, 2.0]])
    assert fit_temperature(bad, np.array([0, 1])) == 1.0
    assert fit_temperature(np.array([[np.inf, 0.0, 0.0]]), np.array([0])) == 1.0


def test_fit_temperature_separable_data_stops_at_the_bound():
    labels = np.array([0, 1, 2, 0, 1, 2])
    logits = np.eye(3)[labels] * 2.0  # always right: the loss keeps falling as T -> 0
    t = fit_temperature(logits, labels)
    assert T_MIN <= t < T_MIN * 1.01


def test_fit_temperature_rejects_bad_shapes_and_labels():
    with pytest.raises(ValueError, match="shape"):
        fit_temperature(np.zeros((4, 2)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="shape"):
        fit_temperature(np.zeros((4, 3)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.random.default_rng(0).normal(size=(2, 3)), np.array([0, 3]))


# --- pure numbers ------------------------------------------------------------------------------------------------


def test_reliability_bins_hand_example():
    conf = np.array([0.0, 0.1, 0.15, 0.55, 0.6, 1.0])
    hit = np.array([0, 1, 0, 1, 1, 1])
    b = reliability_bins(conf, hit, n_bins=10)
    assert b.count.tolist() == [2, 1, 0, 0, 0, 2, 0, 0, 0, 1]  # (lo, hi]: 0.1 is in the first bin, 0.6 in the sixth
    assert b.confidence[0] == pytest.approx(0.05) and b.accuracy[0] == pytest.approx(0.5)
    assert b.accuracy[1] == 0.0 and b.accuracy[9] == 1.0
    assert np.isnan(b.confidence[2]) and np.isnan(b.accuracy[2])


def test_ece_hand_example_and_limits():
    # Two rows at confidence 0.9 in the same bin, one right: |0.5 - 0.9| = 0.4 over the whole sample.
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.4)
    assert expected_calibration_error(np.eye(3), np.array([0, 1, 2])) == pytest.approx(0.0)
    logits, labels = calibrated_sample(20000, seed=3)
    assert expected_calibration_error(softmax(logits), labels) < 0.02
    assert expected_calibration_error(softmax(logits * 3), labels) > 0.1


def test_confusion_matrix_matches_sklearn_and_row_shares():
    from sklearn.metrics import confusion_matrix as sk_confusion

    rng = np.random.default_rng(4)
    probs, labels = rng.dirichlet(np.ones(3), size=300), rng.integers(0, 3, size=300)
    counts = confusion_matrix(probs, labels)
    np.testing.assert_array_equal(counts, sk_confusion(labels, probs.argmax(axis=1), labels=[0, 1, 2]))
    np.testing.assert_allclose(row_shares(counts).sum(axis=1), 1.0)
    empty_row = row_shares(np.array([[2, 1, 1], [0, 0, 0], [0, 1, 3]]))
    assert empty_row[1].tolist() == [0.0, 0.0, 0.0] and empty_row[0, 0] == 0.5


def test_prior_log_loss_is_label_entropy():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    freq = np.array([0.5, 0.3, 0.2])
    assert prior_log_loss(labels) == pytest.approx(-np.sum(freq * np.log(freq)))
    assert prior_log_loss(np.array([0, 1, 2])) == pytest.approx(math.log(3))


def test_smooth_is_bias_corrected_and_lags():
    np.testing.assert_allclose(smooth(np.full(20, 0.7)), 0.7)  # no pull towards 0 at the start
    ramp = np.linspace(2.0, 1.0, 50)
    s = smooth(ramp)
    assert s[0] == pytest.approx(2.0)
    assert np.all(s[1:] > ramp[1:]) and np.all(np.diff(s) < 0)  # a falling curve is followed from above
    assert len(smooth(np.array([]))) == 0


# --- reading -----------------------------------------------------------------------------------------------------


def test_read_metrics_last_entry_wins_and_errors_name_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"step": 1, "loss": 1.2, "lr": 1e-5}),
                json.dumps({"step": 2, "loss": 1.1}),
                "",
                json.dumps({"step": 2, "val_logloss": 1.05, "val_accuracy": 0.41}),
                json.dumps({"step": 2, "loss": 1.0}),  # resumed run re-logs step 2
                json.dumps({"step": 3, "loss": float("nan")}),  # non-finite values are dropped
            ]
        )
    )
    c = read_metrics(path)
    assert c.train_step.tolist() == [1, 2] and c.train_loss.tolist() == [1.2, 1.0]
    assert c.lr_step.tolist() == [1] and c.val_step.tolist() == [2] and c.val_logloss.tolist() == [1.05]
    assert c.val_accuracy == {2: 0.41}
    assert len(read_metrics(tmp_path / "absent.jsonl").train_loss) == 0
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)
    path.write_text(json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: .*'step'"):
        read_metrics(path)


def test_read_predictions_defaults_and_errors(tmp_path):
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    np.savez(tmp_path / "p.npz", probs=probs, labels=np.array([0, 2]))
    p = read_predictions(tmp_path / "p.npz")
    np.testing.assert_allclose(softmax(p.logits), probs)  # log(probs) stands in for missing logits
    assert read_predictions(tmp_path / "none.npz") is None
    np.savez(tmp_path / "bad.npz", probs=probs, labels=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="bad.npz"):
        read_predictions(tmp_path / "bad.npz")
    np.savez(tmp_path / "nolabels.npz", probs=probs)
    with pytest.raises(ValueError, match="labels"):
        read_predictions(tmp_path / "nolabels.npz")


# --- the written report ------------------------------------------------------------------------------------------


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_run(run_dir, steps=200, eval_every=50, preds=True, seed=0):
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 1.1 - 0.2 * s / steps + rng.normal() * 0.05, "lr": 1e-5}) + "\n")
            if eval_every and s % eval_every == 0:
                f.write(json.dumps({"step": s, "val_logloss": 1.08 - 0.1 * s / steps, "val_accuracy": 0.5}) + "\n")
    if preds:
        logits, labels = calibrated_sample(3000, seed)
        logits = logits * 3  # over-confident
        np.savez(run_dir / "val_predictions.npz", probs=softmax(logits), labels=labels, logits=logits)


def test_write_report_full_run(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    s = write_report(run)
    out = run / "report"
    for name in ("loss.png", "calibration.png", "confusion.png"):
        w, h = png_size(out / name)
        assert w > 400 and h > 300 and (out / name).stat().st_size > 15_000, name
    assert s["steps"] == 200 and s["evaluations"] == 4
    assert abs(s["temperature"] - 3.0) < 0.25
    assert s["val_logloss_scaled"] < s["val_logloss"] - 0.05
    assert s["ece_scaled"] < s["ece"] / 3
    assert s["val_logloss_best"] == pytest.approx(0.98) and s["val_logloss_best_step"] == 200
    pred = read_predictions(run / "val_predictions.npz")
    assert s["val_logloss"] == pytest.approx(log_loss(pred.probs, pred.labels))
    assert s["prior_logloss"] == pytest.approx(prior_log_loss(pred.labels))
    md = (out / "report.md").read_text()
    for key in ("val_logloss", "val_logloss_scaled", "ece", "ece_scaled", "prior_logloss", "val_logloss_best"):
        assert f"{s[key]:.4f}" in md, key
    assert f"{s['temperature']:.3f}" in md
    for name in ("loss.png", "calibration.png", "confusion.png"):
        assert f"]({name})" in md
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    assert json.dumps(s)  # the summary is plain JSON-able numbers (the training loop may log it)


def test_write_report_without_evaluation(tmp_path):
    run = tmp_path / "run"
    write_run(run, steps=30, eval_every=0, preds=False)
    (run / "report").mkdir()
    (run / "report" / "calibration.png").write_bytes(b"stale")  # left by an earlier report of this directory
    s = write_report(run)
    assert png_size(run / "report" / "loss.png")[0] > 400
    assert not (run / "report" / "calibration.png").exists() and not (run / "report" / "confusion.png").exists()
    assert "temperature" not in s and "val_logloss_final" not in s and s["steps"] == 30
    md = (run / "report" / "report.md").read_text()
    assert "not evaluated" in md and "No val_predictions.npz" in md and "calibration.png" not in md


def test_write_report_empty_run_and_given_temperature(tmp_path):
    s = write_report(tmp_path / "empty")
    assert s["steps"] == 0 and "No metrics were logged" in (tmp_path / "empty" / "report" / "report.md").read_text()
    run = tmp_path / "run"
    write_run(run, steps=20, eval_every=10)
    s = write_report(run, temperature=1.0)  # the export's T is reported, not refitted
    assert s["temperature"] == 1.0 and s["val_logloss_scaled"] == pytest.approx(s["val_logloss"])
    assert "T = 1" in (run / "report" / "report.md").read_text()
    assert png_size(run / "report" / "calibration.png")[0] > 400


def test_matplotlib_is_not_imported_by_the_module():
    import subprocess
    import sys

    code = "import sys, training.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_fit_temperature_accepts_torch_tensors():
    import torch

    logits, labels = calibrated_sample(2000, seed=5)
    expected = fit_temperature(logits * 2, labels)
    t = fit_temperature(torch.tensor(logits * 2, dtype=torch.bfloat16), torch.tensor(labels))
    assert t == pytest.approx(expected, rel=0.02)  # bf16 rounding of the logits moves the optimum a little


def test_cli_regenerates_the_report(tmp_path, capsys):
    write_run(tmp_path / "run", steps=20, eval_every=10)
    report.main([str(tmp_path / "run"), "--temperature", "2.5"])
    assert json.loads(capsys.readouterr().out)["temperature"] == 2.5
    assert "2.500" in (tmp_path / "run" / "report" / "report.md").read_text()
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing")])


def test_tta_temperature_fits_the_swap_average():
    """Averaging the two views already softens: the TTA temperature is below the single-view one, and it minimises
    the log loss of the TTA average that inference serves."""
    from inference.submission import softmax, tta_average
    from training.report import fit_temperature

    rng = np.random.default_rng(0)
    n = 3000
    true = rng.normal(size=(n, 3)) * 2.0
    labels = np.array([rng.choice(3, p=p) for p in softmax(true)])
    noise = rng.normal(size=(n, 3))
    logits = 3.0 * (true + noise)  # over-confident views, each with its own noise
    logits_swap = 3.0 * (true + rng.normal(size=(n, 3)))[:, [1, 0, 2]]
    t_one = fit_temperature(logits, labels)
    t_tta = fit_temperature(logits, labels, logits_swap=logits_swap)
    assert t_tta < t_one

    def tta_loss(t):
        return log_loss(tta_average(softmax(logits, t), softmax(logits_swap, t)), labels)

    assert tta_loss(t_tta) < tta_loss(t_one) - 1e-3
    assert tta_loss(t_tta) <= min(tta_loss(t) for t in np.linspace(0.5, 6, 200)) + 1e-4


def test_report_headline_is_the_served_tta_prediction_and_pairs_compare_like_with_like(tmp_path):
    """With both views saved, the headline is the A/B-swap average at the TTA temperature (what arena-predict
    serves); 'before T' is the same average at T = 1; the single view is a separate row with its own T."""
    run = tmp_path / "run"
    write_run(run, preds=False)
    logits, labels = calibrated_sample(3000, 4)
    rng = np.random.default_rng(5)
    logits, swap = logits * 3, logits * 3 + rng.normal(0, 0.8, logits.shape)  # two over-confident, noisy views
    probs = tta_average(softmax(logits), softmax(swap))
    np.savez(run / "val_predictions.npz", probs=probs, labels=labels, logits=logits, logits_swap=swap)
    s = write_report(run, temperature=2.5, temperature_no_tta=2.8)
    served = tta_average(softmax(logits, 2.5), softmax(swap, 2.5))
    assert s["tta"] and s["temperature"] == 2.5 and s["temperature_no_tta"] == 2.8
    assert s["served_logloss"] == pytest.approx(log_loss(served, labels), abs=1e-12)
    assert s["val_logloss"] == pytest.approx(log_loss(probs, labels), abs=1e-12)  # same average, T = 1
    assert s["single_logloss_scaled"] == pytest.approx(log_loss(softmax(logits, 2.8), labels), abs=1e-12)
    assert s["served_logloss"] < s["val_logloss"] and s["single_logloss_scaled"] < s["single_logloss"]
    assert s["ece_scaled"] == pytest.approx(expected_calibration_error(served, labels))
    md = (run / "report" / "report.md").read_text()
    assert f"**{s['served_logloss']:.4f}**" in md and "A/B-swap average, T = 2.500" in md
    assert json.loads((run / "report" / "summary.json").read_text())["served_logloss"] == s["served_logloss"]
