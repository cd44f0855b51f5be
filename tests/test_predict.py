"""arena-predict end to end on the CPU: real worker processes (spawn), the tiny exported model, the synthetic sample.

Each run costs a few seconds of worker start-up, so runs are shared through module fixtures where possible.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from inference.predict import EXIT_DEGRADED, EXIT_OK, EXIT_USAGE, PredictConfig, predict
from inference.submission import HEADER, softmax, validate_submission
from tests.conftest import ROOT

pytestmark = pytest.mark.distributed


def read_sub(path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == HEADER
    return [r[0] for r in rows[1:]], np.array([[float(x) for x in r[1:]] for r in rows[1:]])


def test_ids(test_csv) -> list[str]:
    with open(test_csv, newline="") as f:
        return [r["id"] for r in csv.DictReader(f)]


test_ids.__test__ = False  # a helper, not a test


def reference_probs(model_dir, test_csv, tta=True, base_model=None, limit=None) -> np.ndarray:
    """The naive way: one row at a time, no padding, no workers (what every run must agree with)."""
    import torch

    from data.reading import read_battles
    from data.template import FormatConfig, Formatter
    from data.tokenizer import load_tokenizer
    from inference.loading import LoadSpec, load_model

    model, meta = load_model(LoadSpec(str(model_dir), base_model), "cpu")
    fmt = Formatter(load_tokenizer(model_dir), FormatConfig.from_dict(meta["format"]))
    t = meta.get("temperature") or 1.0
    out = []
    with torch.no_grad():
        for turns in fmt.tokenize(read_battles(test_csv, lenient=True)[:limit]):
            p = softmax(model(torch.tensor([fmt.render(turns)])).numpy(), t)[0]
            if tta:
                ps = softmax(model(torch.tensor([fmt.render(turns, swap=True)])).numpy(), t)[0]
                p = 0.5 * (p + ps[[1, 0, 2]])
            out.append(p)
    return np.array(out)


def config(model_dir, test_csv, out, **kw) -> PredictConfig:
    kw.setdefault("devices", "cpu")
    kw.setdefault("time_budget", None)
    return PredictConfig(models=(str(model_dir),), test=str(test_csv), out=str(out), **kw)


@pytest.fixture(scope="module")
def one_worker(tiny_export_dir, sample_dir, tmp_path_factory):
    """The reference run: one CPU worker, TTA on."""
    out = tmp_path_factory.mktemp("one") / "submission.csv"
    result = predict(config(tiny_export_dir, sample_dir / "test.csv", out))
    assert result.exit_code == EXIT_OK, result.messages
    return read_sub(out)[1]


def test_one_worker_matches_naive_row_by_row_reference(one_worker, tiny_export_dir, sample_dir):
    ref = reference_probs(tiny_export_dir, sample_dir / "test.csv")
    assert np.abs(one_worker - ref).max() < 1e-5


def test_two_workers_equal_one_worker_in_sample_submission_format(one_worker, tiny_export_dir, sample_dir, tmp_path):
    from inference.cli import main

    out = tmp_path / "submission.csv"
    code = main(["--model", str(tiny_export_dir), "--test", str(sample_dir / "test.csv"), "--out", str(out),
                 "--devices", "cpu:2", "--time-budget", "none", "--log-level", "WARNING"])
    assert code == EXIT_OK
    ids, probs = read_sub(out)
    with open(sample_dir / "sample_submission.csv", newline="") as f:
        sample = list(csv.reader(f))
    assert tuple(sample[0]) == HEADER
    assert ids == [r[0] for r in sample[1:]] == test_ids(sample_dir / "test.csv")
    assert np.allclose(probs.sum(axis=1), 1) and np.all(np.isfinite(probs))
    assert np.abs(probs - one_worker).max() < 1e-6  # same batches, other processes: same numbers
    assert validate_submission(out, ids) == []


def swapped_csv(src: Path, dst: Path) -> Path:
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, "response_a": r["response_b"], "response_b": r["response_a"]})
    return dst


def test_tta_makes_predictions_swap_symmetric(one_worker, tiny_export_dir, sample_dir, tmp_path):
    swapped = swapped_csv(sample_dir / "test.csv", tmp_path / "swapped.csv")
    result = predict(config(tiny_export_dir, swapped, tmp_path / "sub.csv", devices="cpu:2"))
    assert result.exit_code == EXIT_OK
    p_swapped = read_sub(tmp_path / "sub.csv")[1]
    assert np.abs(one_worker[:, 0] - p_swapped[:, 1]).max() < 1e-6  # p_A(x) == p_B(swap(x))
    assert np.abs(one_worker[:, 2] - p_swapped[:, 2]).max() < 1e-6
    # and it is not symmetric by accident: the model alone is not
    no_tta = reference_probs(tiny_export_dir, sample_dir / "test.csv", tta=False, limit=10)
    no_tta_swapped = reference_probs(tiny_export_dir, swapped, tta=False, limit=10)
    assert np.abs(no_tta[:, 0] - no_tta_swapped[:, 1]).max() > 1e-3


def test_slow_model_finishes_within_budget(tiny_export_dir, sample_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ARENA_DEBUG_SLEEP_PER_BATCH", "1.5")
    budget = 20.0
    t0 = time.monotonic()
    # 1024-token batches: 2 rows with TTA, 4 without, more when shortened, so cheaper modes mean fewer sleeps.
    # Full TTA needs 30 batches x 1.5 s over 2 workers = 22.5 s plus loading: more than the budget on any machine
    result = predict(config(tiny_export_dir, sample_dir / "test.csv", tmp_path / "sub.csv", devices="cpu:2",
                            time_budget=budget, batch_tokens=1024, checkpoint_every=2.0), t0=t0)
    elapsed = time.monotonic() - t0
    assert elapsed <= budget + 2.0, elapsed
    assert result.exit_code == EXIT_DEGRADED
    text = "\n".join(result.messages)
    # normally the least uncertain swapped views are dropped first (--tta on asked for all: a DEGRADED line), then
    # max_length shortened; on a very loaded machine the workers may not even finish loading before the deadline,
    # and then every row gets the prior
    assert "rows got both views" in text or "time budget reached" in text, text
    assert validate_submission(tmp_path / "sub.csv", test_ids(sample_dir / "test.csv")) == []


def test_killed_worker_rows_are_rerun_on_the_other(one_worker, tiny_export_dir, sample_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ARENA_DEBUG_EXIT_AFTER", "1:1")
    result = predict(config(tiny_export_dir, sample_dir / "test.csv", tmp_path / "sub.csv", devices="cpu:2"))
    assert result.exit_code == EXIT_DEGRADED
    assert any("worker 1 (cpu) died (exit code 3) after 1 batches" in m and "re-queued" in m
               for m in result.messages), result.messages
    ids, probs = read_sub(tmp_path / "sub.csv")
    assert validate_submission(tmp_path / "sub.csv", ids) == []
    assert np.abs(probs - one_worker).max() < 1e-6  # nothing was lost: the surviving worker re-ran the rows


def test_killed_only_worker_leaves_prior_rows_named(one_worker, tiny_export_dir, sample_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ARENA_DEBUG_EXIT_AFTER", "0:1")
    result = predict(config(tiny_export_dir, sample_dir / "test.csv", tmp_path / "sub.csv", devices="cpu"))
    assert result.exit_code == EXIT_DEGRADED
    text = "\n".join(result.messages)
    assert "worker 0 (cpu) died (exit code 3)" in text and "no worker" in text
    assert "rows got the prior" in text
    ids, probs = read_sub(tmp_path / "sub.csv")
    assert validate_submission(tmp_path / "sub.csv", test_ids(sample_dir / "test.csv")) == []
    # the batch it finished holds first views (TTA is a second pass, after every row's first view)
    one_view = reference_probs(tiny_export_dir, sample_dir / "test.csv", tta=False)
    scored = np.abs(probs - one_view).max(axis=1) < 1e-5
    prior = np.all(np.isclose(probs, [0.35, 0.35, 0.30]), axis=1)
    assert scored.sum() >= 1 and prior.sum() >= 1 and np.all(scored | prior)
    assert str(ids[np.flatnonzero(prior)[0]]) in text  # the message names lost rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "prompt", "response_a", "response_b"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_odd_rows_are_predicted_and_named(tiny_export_dir, tmp_path, caplog):
    rows = [
        {"id": "1", "prompt": '["hi"]', "response_a": '["hello"]', "response_b": '["hey"]'},
        {"id": "2", "prompt": '["hi"', "response_a": '["hello"]', "response_b": '["hey"]'},  # malformed JSON
        {"id": "3", "prompt": '["a", "b"]', "response_a": '["x"]', "response_b": '["y", "z"]'},  # turn counts
        {"id": "4", "prompt": '[null]', "response_a": '[null]', "response_b": '["only B"]'},  # null turns
        {"id": "5", "prompt": "", "response_a": "", "response_b": ""},  # empty cells
    ]
    test = write_rows(tmp_path / "test.csv", rows)
    with caplog.at_level("WARNING", logger="arena.predict"):
        result = predict(config(tiny_export_dir, test, tmp_path / "sub.csv", tta=False))
    ids, probs = read_sub(tmp_path / "sub.csv")
    assert ids == ["1", "2", "3", "4", "5"] and validate_submission(tmp_path / "sub.csv", ids) == []
    assert result.exit_code == EXIT_OK  # odd input is not a degradation of the run
    assert "ids 2, 3, 5" in result.notes[0]
    logged = caplog.text
    for rid in ("id 2", "id 3", "id 5"):
        assert rid in logged
    assert len({tuple(np.round(p, 6)) for p in probs}) == 5  # each row predicted from its own content


@pytest.mark.parametrize("content,expect", [
    ("id,prompt,response_a\n1,\"[\"\"a\"\"]\",\"[\"\"b\"\"]\"\n", "column response_b"),
    ("\x00\x01binary\x00junk", "not a CSV"),
    ("", "empty"),
])
def test_unreadable_test_file_is_a_clear_error(tiny_export_dir, tmp_path, capsys, content, expect):
    from inference.cli import main

    test = tmp_path / "test.csv"
    test.write_bytes(content.encode())
    code = main(["--model", str(tiny_export_dir), "--test", str(test), "--out", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert str(test) in err and expect in err


def test_bad_model_dir_is_a_clear_error(sample_dir, tmp_path, capsys):
    from inference.cli import main

    code = main(["--model", str(tmp_path / "nope"), "--test", str(sample_dir / "test.csv"), "--out",
                 str(tmp_path / "s.csv")])
    assert code == EXIT_USAGE and "nope: model directory not found" in capsys.readouterr().err
    assert validate_submission(tmp_path / "s.csv", test_ids(sample_dir / "test.csv")) == []  # uniform, but valid


def test_killing_the_main_process_leaves_a_valid_file(tiny_export_dir, sample_dir, tmp_path):
    out, log = tmp_path / "sub.csv", tmp_path / "log.txt"
    env = {**os.environ, "ARENA_DEBUG_SLEEP_PER_BATCH": "0.5", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "inference", "--model", str(tiny_export_dir), "--test",
                                 str(sample_dir / "test.csv"), "--out", str(out), "--devices", "cpu",
                                 "--checkpoint-every", "1", "--max-batch-rows", "4"],
                                cwd=ROOT, env=env, stderr=err, stdout=subprocess.DEVNULL)
        try:
            end = time.monotonic() + 60
            while "loaded model" not in log.read_text() and time.monotonic() < end:
                time.sleep(0.2)
            time.sleep(3.0)  # a few batches and checkpoints
            assert proc.poll() is None, log.read_text()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    ids = test_ids(sample_dir / "test.csv")
    assert validate_submission(out, ids) == []
    probs = read_sub(out)[1]
    assert not np.all(np.isclose(probs, [0.35, 0.35, 0.30]))  # the checkpoints hold scored rows


def test_export_without_weights_is_refused_before_workers_start(tiny_export_dir, sample_dir, tmp_path, capsys):
    import shutil

    from inference.cli import main

    broken = tmp_path / "export"
    shutil.copytree(tiny_export_dir, broken)
    (broken / "model.safetensors").unlink()
    code = main(["--model", str(broken), "--test", str(sample_dir / "test.csv"), "--out", str(tmp_path / "s.csv")])
    assert code == EXIT_USAGE and "no backbone weights" in capsys.readouterr().err


def test_model_no_worker_can_load_fails_instead_of_a_silent_prior_file(tiny_export_dir, sample_dir, tmp_path):
    """Corrupt weights pass the pre-flight check but kill every worker's load: exit 2 (bad input), never 'degraded'
    (3), so a Kaggle notebook's Save Version stops instead of accepting a prior-only submission."""
    import shutil

    broken = tmp_path / "export"
    shutil.copytree(tiny_export_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    result = predict(config(broken, sample_dir / "test.csv", tmp_path / "sub.csv", devices="cpu:2"))
    assert result.exit_code == EXIT_USAGE
    assert "no worker could load" in result.messages[0]
    assert validate_submission(tmp_path / "sub.csv", test_ids(sample_dir / "test.csv")) == []
