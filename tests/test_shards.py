"""`arena-predict --shard K/N` slices and `arena-data merge`: joins in order, refuses overlaps, gaps, foreign shards."""
import csv
import json

import numpy as np
import pytest

from data.shards import file_sha256, parse_shard, shard_bounds, sidecar, sidecar_path, write_sidecar
from tests.helpers.cli import read_sub, run_data, run_data_process, write_sub


@pytest.mark.parametrize("text", ["0/1", "2/3", "15/16"])
def test_parse_shard_accepts(text):
    k, n = map(int, text.split("/"))
    assert parse_shard(text) == (k, n)


@pytest.mark.parametrize("text", ["3/3", "-1/3", "1", "a/b", "1/0", "1/3/4", ""])
def test_parse_shard_refuses(text):
    with pytest.raises(ValueError, match="K/N"):
        parse_shard(text)


@pytest.mark.parametrize("rows", [1, 7, 10, 101])
@pytest.mark.parametrize("of", [1, 3, 8])
def test_shards_cover_every_row_once_in_order(rows, of):
    bounds = [shard_bounds(rows, k, of) for k in range(of)]
    assert [i for a, b in bounds for i in range(a, b)] == list(range(rows))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def _test_csv(sample_dir):
    with open(sample_dir / "test.csv", newline="") as f:
        return [r["id"] for r in csv.DictReader(f)]


@pytest.fixture
def shards(sample_dir, tmp_path):
    """Three shard files of the sample test file, as arena-predict --shard K/3 writes them (sidecars included)."""
    test = sample_dir / "test.csv"
    ids = _test_csv(sample_dir)
    probs = np.random.default_rng(0).dirichlet([1, 1, 1], size=len(ids))
    sha = file_sha256(test)
    paths = []
    for k in range(3):
        a, b = shard_bounds(len(ids), k, 3)
        p = write_sub(tmp_path / f"probs.{k}.csv", ids[a:b], probs[a:b])
        write_sidecar(p, sidecar(k, 3, len(ids), test, sha))
        paths.append(p)
    return {"test": test, "ids": ids, "probs": probs, "paths": paths}


def test_merge_joins_shards_in_file_order_with_and_without_test(shards, tmp_path, capsys):
    out = tmp_path / "probs.csv"
    p0, p1, p2 = shards["paths"]
    for extra in ([], ["--test", shards["test"]]):
        code, stdout, err = run_data(capsys, "merge", p2, p0, p1, "--out", out, *extra)
        assert code == 0, err
        ids, probs = read_sub(out)
        assert ids == shards["ids"] and np.abs(probs - shards["probs"]).max() < 1e-12
        assert f"{len(ids)} rows from 3 shard(s)" in stdout


def test_merge_refuses_overlapping_shards_naming_id_and_both_files(shards, tmp_path, capsys):
    p0, p1, p2 = shards["paths"]
    a, b = shard_bounds(len(shards["ids"]), 1, 3)
    dup = write_sub(tmp_path / "dup.csv", shards["ids"][a - 1:b], shards["probs"][a - 1:b])  # one row of shard 0
    code, _, err = run_data(capsys, "merge", p0, dup, p2, "--out", tmp_path / "m.csv", "--test", shards["test"])
    assert code == 1 and f"{dup}: id {shards['ids'][a - 1]}: column id: id also in {p0}" in err, err
    assert not (tmp_path / "m.csv").exists()


def test_merge_refuses_a_missing_shard_from_the_sidecars(shards, tmp_path, capsys):
    p0, _, p2 = shards["paths"]
    code, _, err = run_data(capsys, "merge", p0, p2, "--out", tmp_path / "m.csv")
    assert code == 1 and "shard(s) 1/3 missing (2 of 3 given)" in err, err


def test_merge_without_sidecars_needs_test_and_then_finds_the_gap(shards, tmp_path, capsys):
    for p in shards["paths"]:
        sidecar_path(p).unlink()
    p0, _, p2 = shards["paths"]
    code, _, err = run_data(capsys, "merge", p0, p2, "--out", tmp_path / "m.csv")
    assert code == 1 and "give --test" in err
    code, _, err = run_data(capsys, "merge", p0, p2, "--out", tmp_path / "m.csv", "--test", shards["test"])
    a, b = shard_bounds(len(shards["ids"]), 1, 3)
    assert code == 1 and f"{shards['test']}: column id: {b - a} id(s) are in no shard, e.g. ['{shards['ids'][a]}'" in err


def test_merge_refuses_shards_of_another_file_and_truncated_shards(shards, tmp_path, capsys):
    p0, p1, p2 = shards["paths"]
    other = tmp_path / "other.csv"
    other.write_bytes(shards["test"].read_bytes() + b"\n")
    info = json.loads(sidecar_path(p1).read_text())
    write_sidecar(p1, {**info, "test_sha256": file_sha256(other)})
    code, _, err = run_data(capsys, "merge", p0, p1, p2, "--out", tmp_path / "m.csv")
    assert code == 1 and f"{p1}: shard 1/3 of a file with sha256" in err and "shards of different runs" in err
    write_sidecar(p1, info)
    code, _, err = run_data(capsys, "merge", p0, p1, p2, "--out", tmp_path / "m.csv", "--test", other)
    assert code == 1 and f"scored a file with sha256 {info['test_sha256'][:12]}, not {other}" in err
    lines = p2.read_text().splitlines()
    p2.write_text("\n".join(lines[:-2]) + "\n")  # a shard cut short
    code, _, err = run_data(capsys, "merge", p0, p1, p2, "--out", tmp_path / "m.csv")
    assert code == 1 and f"{p2}: {len(lines) - 3} rows, but shard 2/3" in err, err


def test_merge_refuses_rows_not_summing_to_one_and_a_wrong_header(shards, tmp_path):
    p0, p1, p2 = shards["paths"]
    text = p1.read_text().splitlines()
    rid = text[3].split(",")[0]
    text[3] = f"{rid},0.5,0.5,0.5"
    p1.write_text("\n".join(text) + "\n")
    r = run_data_process("merge", p0, p1, p2, "--out", tmp_path / "m.csv")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{p1}: line 4: id {rid}: column winner_model_a+winner_model_b+winner_tie: probabilities sum to 1.5" in r.stderr
    p1.write_text("id,a,b,c\n1,0.2,0.3,0.5\n")
    r = run_data_process("merge", p0, p1, p2, "--out", tmp_path / "m.csv")
    assert r.returncode == 1 and f"{p1}: header must be id,winner_model_a" in r.stderr and "Traceback" not in r.stderr


# --- arena-predict --shard, end to end (worker processes) ---------------------------------------------------------
@pytest.mark.distributed  # a worker process, like tests/test_predict.py
def test_predict_shard_scores_only_its_slice_and_writes_the_sidecar(tiny_export_dir, sample_dir, tmp_path, capsys):
    """One worker start per shard run is the cost, so one shard: the middle one of 3 over 7 rows (rows 2..3)."""
    from inference.cli import main
    from inference.predict import EXIT_OK
    from tests.test_predict import reference_probs

    test = tmp_path / "test.csv"
    with open(sample_dir / "test.csv", newline="") as f:
        rows = list(csv.reader(f))
    with open(test, "w", newline="") as f:
        csv.writer(f).writerows(rows[:8])
    out = tmp_path / "probs.1.csv"
    sidecar_path(out).write_text("{}")  # a stale sidecar of an earlier run must not survive
    code = main(["--model", str(tiny_export_dir), "--test", str(test), "--out", str(out), "--devices", "cpu",
                 "--time-budget", "none", "--log-level", "WARNING", "--shard", "1/3"])
    assert code == EXIT_OK
    ids, probs = read_sub(out)
    assert ids == [r[0] for r in rows[3:5]]
    assert np.abs(probs - reference_probs(tiny_export_dir, test)[2:4]).max() < 1e-5
    info = json.loads(sidecar_path(out).read_text())
    assert info == {**sidecar(1, 3, 7, test, file_sha256(test))}
    # the other two shards (written here) and this one merge into the file's 7 rows in order
    full = reference_probs(tiny_export_dir, test)
    for k in (0, 2):
        a, b = shard_bounds(7, k, 3)
        p = write_sub(tmp_path / f"probs.{k}.csv", [r[0] for r in rows[1 + a:1 + b]], full[a:b])
        write_sidecar(p, sidecar(k, 3, 7, test, file_sha256(test)))
    code, _, err = run_data(capsys, "merge", tmp_path / "probs.2.csv", out, tmp_path / "probs.0.csv",
                            "--out", tmp_path / "probs.csv", "--test", test)
    assert code == 0, err
    ids, merged = read_sub(tmp_path / "probs.csv")
    assert ids == [r[0] for r in rows[1:8]] and np.abs(merged - full).max() < 1e-5


@pytest.mark.parametrize("shard, expect", [("3/3", "0 <= K < N"), ("x", "K/N"), ("0/8", "no rows")])
def test_predict_bad_shard_is_a_usage_error(tiny_export_dir, sample_dir, tmp_path, capsys, shard, expect):
    from inference.cli import main

    test = tmp_path / "test.csv"
    with open(sample_dir / "test.csv", newline="") as f:
        rows = list(csv.reader(f))
    with open(test, "w", newline="") as f:
        csv.writer(f).writerows(rows[:4])  # 3 rows: shard 0 of 8 is empty
    try:
        code = main(["--model", str(tiny_export_dir), "--test", str(test), "--out", str(tmp_path / "s.csv"),
                     "--devices", "cpu", "--shard", shard])
    except SystemExit as e:
        code = e.code
    assert code == 2 and expect in capsys.readouterr().err
    assert not sidecar_path(tmp_path / "s.csv").exists()
