"""Reading and validating competition files: real quirks are accepted, broken files name file, id and column."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from data.reading import DataError, clean_text, read_battles, swap, validate
from tests.conftest import REAL_TEST, REAL_TRAIN, ROOT, needs_shared

HEADER = "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n"


def _row(i, p='["hi"]', a='["a"]', b='["b"]', w=(1, 0, 0)):
    q = lambda s: '"' + s.replace('"', '""') + '"'  # noqa: E731
    return f"{i},m1,m2,{q(p)},{q(a)},{q(b)},{w[0]},{w[1]},{w[2]}\n"


def _write(tmp_path, body, header=HEADER, name="train.csv"):
    p = tmp_path / name
    p.write_text(header + body, encoding="utf-8")
    return p


@needs_shared
def test_real_train_reads_all_rows_with_null_turns():
    battles = read_battles(REAL_TRAIN)
    assert len(battles) == 999
    assert sum(b.label == 0 for b in battles) == 352 and sum(b.label == 2 for b in battles) == 295
    raw = pd.read_csv(REAL_TRAIN)
    null_rows = [r.id for r in raw.itertuples() if None in json.loads(r.response_a) + json.loads(r.response_b)]
    assert null_rows, "the real sample is known to hold null turns"
    by_id = {b.id: b for b in battles}
    for rid in null_rows:
        b = by_id[rid]
        assert "" in b.response_a + b.response_b
        assert len(b.prompt) == len(b.response_a) == len(b.response_b)
    assert max(b.n_turns for b in battles) > 1


@needs_shared
def test_real_test_file_has_no_labels():
    battles = read_battles(REAL_TEST)
    assert len(battles) == 3 and all(b.label is None for b in battles)


def test_broken_unicode_is_repaired(tmp_path):
    p = _write(tmp_path, _row(1, p='["bad \\ud83d end", "pair \\ud83d\\ude00"]', a='["x", null]', b='["y", "z"]'))
    (b,) = read_battles(p)
    assert b.prompt[0] == "bad \ufffd end" and b.prompt[1] == "pair \U0001F600"
    assert b.response_a == ("x", "")
    b.prompt[0].encode("utf-8")  # must not raise
    assert clean_text(None) == ""


@pytest.mark.parametrize(
    "body, header, expect",
    [
        (_row(7, p='["unclosed'), HEADER, ["id 7", "column prompt", "malformed JSON"]),
        (_row(8, a='["x", "y"]'), HEADER, ["id 8", "column response_a", "different lengths"]),
        (_row(9, w=(1, 1, 0)), HEADER, ["id 9", "column winner_model_a", "exactly one 1"]),
        (_row(3) + _row(3), HEADER, ["id 3", "column id", "duplicate"]),
        (_row(4), HEADER.replace("response_b", "resp_b"), ["column response_b", "missing column"]),
        (_row(5, w=("x", 0, 0)), HEADER, ["id 5", "column winner_model_a", "not a number"]),
    ],
)
def test_problems_name_file_id_and_column(tmp_path, body, header, expect):
    p = _write(tmp_path, body, header)
    rows, problems = validate(p)
    assert rows == 0 and problems
    text = str(problems[0])
    assert str(p) in text
    for e in expect:
        assert e in text, text


def test_empty_and_binary_files(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_text("")
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\x89PNG\x00\x00\x01")
    for f, msg in ((empty, "empty"), (binary, "not a CSV")):
        _, problems = validate(f)
        assert msg in str(problems[0]) and str(f) in str(problems[0])


def test_lenient_keeps_odd_rows_with_warnings(tmp_path):
    p = _write(tmp_path, _row(1) + _row(2, p="not json") + _row(3, a='["x", "y"]'))
    with pytest.raises(DataError) as e:
        read_battles(p)
    assert len(e.value.problems) == 2
    battles = read_battles(p, lenient=True)
    assert [b.id for b in battles] == [1, 2, 3]
    assert battles[1].warnings and "id 2" in battles[1].warnings[0]
    assert battles[2].n_turns == 2 and battles[2].response_b == ("b", "")


def test_train_csv_used_as_test_input_ignores_extra_columns(sample_dir):
    battles = read_battles(sample_dir / "train.csv", labels=False)
    assert all(b.label is None for b in battles)


def test_swap_exchanges_responses_models_and_label():
    from data.reading import Battle

    b = Battle(1, ("p",), ("a",), ("b",), "ma", "mb", 0)
    s = swap(b)
    assert (s.response_a, s.response_b, s.model_a, s.model_b, s.label) == (("b",), ("a",), "mb", "ma", 1)
    assert swap(s) == b
    assert swap(Battle(1, ("p",), ("a",), ("b",), label=2)).label == 2


def test_validate_cli_exit_codes_and_no_traceback(tmp_path):
    bad = _write(tmp_path, _row(1, p='["x'), name="bad.csv")
    cmd = [sys.executable, "-m", "data", "validate"]
    r = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    assert "id 1" in r.stdout and "column prompt" in r.stdout and str(bad) in r.stdout
    missing = subprocess.run(cmd + [str(tmp_path / "nope.csv")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and "Traceback" not in missing.stdout + missing.stderr


def test_many_problems_are_capped_with_total(tmp_path):
    body = "".join(_row(i, p="[") for i in range(80))
    p = _write(tmp_path, body)
    r = subprocess.run([sys.executable, "-m", "data", "validate", str(p)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert "and 30 more" in r.stdout and "80 problem(s)" in r.stdout
