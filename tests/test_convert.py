"""`arena-data convert`: external preference datasets -> train.csv that `arena-data validate` accepts.

Fixtures mirror the datasets' published schemas (checked against their cards): lmsys/chatbot_arena_conversations
(question_id, model_a, model_b, winner, judge, conversation_a/b as {content, role} lists, turn, anony, language,
tstamp, openai_moderation, toxic_chat_tag) and HuggingFaceH4/ultrafeedback_binarized *_prefs (prompt, prompt_id,
chosen, rejected, messages, score_chosen, score_rejected). They are written at test time as JSON, JSONL and Parquet.
"""
import csv
import hashlib
import json
import subprocess
import sys

import pytest

from data.convert import (ID_BASE, RowError, chosen_is_a, convert_file, dump_turns, split_conversation, stable_id,
                          ultrafeedback_row)
from data.reading import read_battles
from tests.conftest import REAL_TRAIN, ROOT, needs_shared

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

MODERATION_KEYS = ["harassment", "harassment/threatening", "hate", "hate/threatening", "self-harm",
                   "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence", "violence/graphic"]


def _conversation(turns, side):
    msgs = []
    for user, *replies in turns:
        msgs.append({"content": user, "role": "user"})
        if replies[side] is not None:
            msgs.append({"content": replies[side], "role": "assistant"})
    return msgs


def arena_record(qid, winner="model_a", turns=(("What is 2+2?", "4", "Four."),), **over):
    """One record with every field of lmsys/chatbot_arena_conversations."""
    rec = {
        "question_id": qid, "model_a": "vicuna-13b", "model_b": "koala-13b", "winner": winner,
        "judge": "arena_user_973", "conversation_a": _conversation(turns, 0), "conversation_b": _conversation(turns, 1),
        "turn": len(turns), "anony": True, "language": "English", "tstamp": 1682351591.1322,
        "openai_moderation": {"categories": {k: False for k in MODERATION_KEYS},
                              "category_scores": {k: 1e-6 for k in MODERATION_KEYS}, "flagged": False},
        "toxic_chat_tag": {"roberta-large": {"flagged": False, "probability": 0.0083},
                           "t5-large": {"flagged": False, "score": 9.4e-05}},
    }
    rec.update(over)
    return rec


def ultra_record(prompt, chosen, rejected, history=()):
    """One record of HuggingFaceH4/ultrafeedback_binarized (train_prefs): chosen/rejected hold the whole conversation."""
    context = []
    for user, reply in history:
        context += [{"content": user, "role": "user"}, {"content": reply, "role": "assistant"}]
    ch = context + [{"content": prompt, "role": "user"}, {"content": chosen, "role": "assistant"}]
    rj = context + [{"content": prompt, "role": "user"}, {"content": rejected, "role": "assistant"}]
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "chosen": ch, "rejected": rj,
            "messages": ch, "score_chosen": 8.5, "score_rejected": 4.0}


ARENA_GOOD = [
    arena_record("58210e39b3fd4441a2bd4a518bb44c2d", "model_a"),
    arena_record("2564acd09e3942fd97657d05282d4389", "model_b",
                 turns=(("Hola, ¿cómo estás?", "¡Bien! 😀", "Muy bien."), ("Y tú?", "", "También.")), language="Spanish"),
    arena_record("90bfd142157948aba01931726c888e7f", "tie"),
    arena_record("a7c5accc53e649a3bc6b2e41d962ebc4", "tie (bothbad)", turns=(("東京の天気は?", "晴れ", None),)),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def run_cli(*args):
    r = subprocess.run([sys.executable, "-m", "data", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    return r


def read_out(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------------- pure parts


def test_split_conversation_pairs_turns_and_tolerates_a_missing_last_reply():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "b \ud83d"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "c"}]
    assert split_conversation(msgs, "conversation_a") == (["a", "b \ufffd", "c"], ["", "B", ""])


@pytest.mark.parametrize("messages, expect", [
    ([], "empty conversation"),
    ("hello", "expected a list"),
    ([{"role": "user", "content": 3}], "message 0 content is int"),
    ([{"role": "user", "content": None}], "message 0 content is NoneType"),
    ([{"role": "assistant", "content": "x"}], "without a user message"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "two user messages"),
    ([{"role": "system", "content": "x"}], "role 'system'"),
    (["just text"], "not an object"),
])
def test_split_conversation_rejects_what_cannot_be_a_battle(messages, expect):
    with pytest.raises(RowError) as e:
        split_conversation(messages, "conversation_b")
    assert e.value.column == "conversation_b" and expect in str(e.value)


def test_ids_are_deterministic_integers_outside_kaggle_range_and_coin_is_per_row():
    a = stable_id("ultrafeedback", "abc")
    assert a == stable_id("ultrafeedback", "abc") and a != stable_id("chatbot-arena-conversations", "abc")
    assert ID_BASE <= a < 2**53
    flips = [chosen_is_a(0, str(i)) for i in range(400)]
    assert 160 < sum(flips) < 240
    assert flips != [chosen_is_a(1, str(i)) for i in range(400)]
    assert dump_turns(["é 😀", "x"]) == '["\\u00e9 \\ud83d\\ude00","x"]'  # the Kaggle files' encoding


def test_ultrafeedback_multi_turn_keeps_shared_context_as_earlier_turns():
    rec = ultra_record("And in French?", "En français : bonjour.", "No.", history=[("Say hello", "Hello!")])
    c = ultrafeedback_row(rec, seed=0)
    b = c.battle
    assert b.prompt == ("Say hello", "And in French?")
    winner = b.response_a if b.label == 0 else b.response_b
    loser = b.response_b if b.label == 0 else b.response_a
    assert winner == ("Hello!", "En français : bonjour.") and loser == ("Hello!", "No.")
    assert c.source_id == rec["prompt_id"] and b.label in (0, 1)


# ------------------------------------------------------------------------------------------------------ through the CLI


def test_arena_conversations_parquet_to_valid_train_csv(tmp_path):
    src = write_parquet(tmp_path / "train-00000-of-00001.parquet", ARENA_GOOD)
    out = tmp_path / "external.csv"
    r = run_cli("convert", "--from", "chatbot-arena-conversations", src, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "4 rows from 4 records" in r.stdout and "0 skipped" in r.stdout and "A 1  B 1  tie 2" in r.stdout
    v = run_cli("validate", out)
    assert v.returncode == 0 and "OK, 4 rows" in v.stdout
    battles = read_battles(out)
    assert [b.label for b in battles] == [0, 1, 2, 2]
    assert all(isinstance(b.id, int) and b.id >= ID_BASE for b in battles)
    multi = battles[1]
    assert multi.prompt == ("Hola, ¿cómo estás?", "Y tú?")
    assert multi.response_a == ("¡Bien! 😀", "") and multi.response_b == ("Muy bien.", "También.")
    assert battles[3].response_b == ("",) and (battles[0].model_a, battles[0].model_b) == ("vicuna-13b", "koala-13b")
    rows = read_out(out)
    assert [row["source_id"] for row in rows] == [rec["question_id"] for rec in ARENA_GOOD]
    assert rows[1]["prompt"] == dump_turns(["Hola, ¿cómo estás?", "Y tú?"])
    again = tmp_path / "again.csv"  # the output is itself a kaggle-format input: a fixed point, source ids kept
    convert_file("kaggle", out, again)
    assert again.read_text(encoding="utf-8") == out.read_text(encoding="utf-8")


def test_json_jsonl_and_parquet_shards_give_the_same_rows(tmp_path):
    outs = []
    (tmp_path / "shards").mkdir()
    write_parquet(tmp_path / "shards" / "train-00000-of-00002.parquet", ARENA_GOOD[:2])
    second = write_parquet(tmp_path / "shards" / "train-00001-of-00002.parquet", ARENA_GOOD[2:])
    array = tmp_path / "arena.json"
    array.write_text(json.dumps(ARENA_GOOD, indent=1), encoding="utf-8")
    lines_as_json = write_jsonl(tmp_path / "arena_lines.json", ARENA_GOOD)  # what datasets' to_json writes
    for i, src in enumerate([tmp_path / "shards", array, lines_as_json, write_jsonl(tmp_path / "arena.jsonl", ARENA_GOOD)]):
        out = tmp_path / f"out{i}.csv"
        s = convert_file("chatbot-arena-conversations", src, out)
        assert (s.records, s.written, s.problem_rows) == (4, 4, 0)
        outs.append(out.read_text(encoding="utf-8"))
    assert len(set(outs)) == 1
    write_parquet(tmp_path / "shards" / "train-00002-of-00002.parquet", ARENA_GOOD[3:])  # a shard repeating a row
    s = convert_file("chatbot-arena-conversations", tmp_path / "shards", tmp_path / "dup.csv")
    assert (s.written, s.problem_rows) == (4, 1)
    assert str(s.problems[0]) == (f"{tmp_path / 'shards' / 'train-00002-of-00002.parquet'}: row 0: id "
                                  f"{ARENA_GOOD[3]['question_id']}: column question_id: duplicate id (first seen at {second} row 1)")


def test_rows_that_cannot_be_converted_are_named_counted_and_strict_fails(tmp_path):
    bad = [
        arena_record("q-diverge", conversation_b=[{"content": "Something else", "role": "user"}, {"content": "x", "role": "assistant"}]),
        arena_record("q-winner", "model_c"),
        {k: v for k, v in arena_record("q-missing").items() if k != "conversation_a"},
        arena_record("q-nonstring", conversation_a=[{"content": {"text": "hi"}, "role": "user"}]),
        arena_record("q-empty", conversation_b=[]),
        arena_record(ARENA_GOOD[0]["question_id"], "model_b"),  # duplicate of row 0
    ]
    src = write_jsonl(tmp_path / "arena.jsonl", ARENA_GOOD + bad)
    with src.open("a", encoding="utf-8") as f:
        f.write('{"question_id": "q-broken", "model_a": \n')  # a truncated line
    out = tmp_path / "ext.csv"
    r = run_cli("convert", "--from", "chatbot-arena-conversations", src, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "4 rows from 11 records" in r.stdout and "7 skipped" in r.stdout
    err = r.stderr
    expect = [
        ("line 5: row 4: id q-diverge: column conversation_b", "user turn 0 differs"),
        ("line 6: row 5: id q-winner: column winner", "unknown winner 'model_c'"),
        ("line 7: row 6: id q-missing: column conversation_a", "missing field"),
        ("line 8: row 7: id q-nonstring: column conversation_a", "message 0 content is dict, not a string"),
        ("line 9: row 8: id q-empty: column conversation_b", "empty conversation"),
        (f"line 10: row 9: id {ARENA_GOOD[0]['question_id']}: column question_id", "duplicate id (first seen at row 0)"),
        ("line 11: row 10", "malformed JSON line (Expecting value at column 40)"),
    ]
    for where, what in expect:
        assert f"{src}: {where}: {what}" in err, err
    assert "7 row(s) could not be converted" in err
    assert run_cli("validate", out).returncode == 0
    assert [b.label for b in read_battles(out)] == [0, 1, 2, 2]  # the duplicate's "model_b" did not replace row 0

    strict_out = tmp_path / "strict.csv"
    s = run_cli("convert", "--from", "chatbot-arena-conversations", src, "--out", strict_out, "--strict")
    assert s.returncode == 1 and not strict_out.exists()
    assert "id q-winner: column winner" in s.stderr and "nothing written (--strict)" in s.stderr
    assert not list(tmp_path.glob(".*.tmp"))


def test_ultrafeedback_labels_balanced_by_seeded_coin(tmp_path):
    recs = [ultra_record(f"Question {i}?", f"good answer {i}", f"bad answer {i}") for i in range(120)]
    src = write_parquet(tmp_path / "train_prefs-00000-of-00001.parquet", recs)
    out0, out0b, out1 = tmp_path / "s0.csv", tmp_path / "s0b.csv", tmp_path / "s1.csv"
    r = run_cli("convert", "--from", "ultrafeedback", src, "--out", out0, "--seed", "0")
    assert r.returncode == 0 and "120 rows" in r.stdout and "tie 0" in r.stdout
    assert run_cli("validate", out0).returncode == 0
    battles = read_battles(out0)
    labels = [b.label for b in battles]
    assert 40 < labels.count(0) < 80 and labels.count(0) + labels.count(1) == 120
    for b in battles:
        good = b.response_a if b.label == 0 else b.response_b
        assert good[0].startswith("good answer") and b.prompt[0].startswith("Question")
    convert_file("ultrafeedback", src, out0b, seed=0)
    convert_file("ultrafeedback", src, out1, seed=1)
    assert out0b.read_text() == out0.read_text()
    assert [b.label for b in read_battles(out1)] != labels
    assert convert_file("ultrafeedback", src, tmp_path / "few.csv", limit=7).written == 7


@needs_shared
def test_kaggle_real_sample_passes_through(tmp_path):
    out = tmp_path / "kaggle.csv"
    r = run_cli("convert", "--from", "kaggle", REAL_TRAIN, "--out", out)
    assert r.returncode == 0 and "999 rows" in r.stdout and "0 skipped" in r.stdout
    assert read_battles(out) == read_battles(REAL_TRAIN)
    assert [row["source_id"] for row in read_out(out)] == [row["id"] for row in read_out(REAL_TRAIN)]


def test_kaggle_rows_from_jsonl_with_lists_and_problems_like_validate(tmp_path):
    ok = {"id": 7, "model_a": "m1", "model_b": "m2", "prompt": ["hi", "again"], "response_a": ["a", None],
          "response_b": ["b", "c"], "winner_model_a": 0, "winner_model_b": 0, "winner_tie": 1}
    as_strings = dict(ok, id="8", prompt='["hi"]', response_a='["a"]', response_b='["b"]', winner_model_a="1", winner_tie="0")
    bad_json = dict(ok, id=9, prompt='["unclosed')
    bad_turns = dict(ok, id=10, response_b=["only one"])
    bad_label = dict(ok, id=11, winner_model_a=1)
    src = write_jsonl(tmp_path / "kaggle.jsonl", [ok, as_strings, bad_json, bad_turns, bad_label])
    out = tmp_path / "k.csv"
    r = run_cli("convert", "--from", "kaggle", src, "--out", out)
    assert r.returncode == 0 and "2 rows" in r.stdout and "3 skipped" in r.stdout
    assert f"{src}: line 3: row 2: id 9: column prompt: malformed JSON" in r.stderr
    assert "id 10: column response_b: turn lists have different lengths" in r.stderr
    assert "id 11: column winner_model_a: winner columns must hold exactly one 1" in r.stderr
    b7, b8 = read_battles(out)
    assert (b7.id, b7.response_a, b7.label, b8.id, b8.label) == (7, ("a", ""), 2, 8, 0)


def test_usage_and_file_errors_exit_2_or_1_without_traceback(tmp_path):
    src = write_jsonl(tmp_path / "arena.jsonl", ARENA_GOOD)
    out = tmp_path / "o.csv"
    r = run_cli("convert", "--from", "lmsys-33k", src, "--out", out)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert all(name in r.stderr for name in ("chatbot-arena-conversations", "ultrafeedback", "kaggle"))
    txt = tmp_path / "arena.txt"
    txt.write_text("x")
    r = run_cli("convert", "--from", "ultrafeedback", txt, "--out", out)
    assert r.returncode == 2 and str(txt) in r.stderr and ".json, .jsonl, .parquet" in r.stderr
    csv_in = tmp_path / "a.csv"
    csv_in.write_text("id\n1\n")
    r = run_cli("convert", "--from", "ultrafeedback", csv_in, "--out", out)
    assert r.returncode == 2 and "cannot read .csv for --from ultrafeedback" in r.stderr
    r = run_cli("convert", "--from", "kaggle", tmp_path / "nope.parquet", "--out", out)
    assert r.returncode == 2 and "no such file" in r.stderr
    r = run_cli("convert", "--from", "kaggle", src, "--out", src)
    assert r.returncode == 2 and "overwrite the input" in r.stderr
    # wrong --from: every row fails -> exit 1, named, nothing written
    r = run_cli("convert", "--from", "ultrafeedback", src, "--out", out)
    assert r.returncode == 1 and not out.exists()
    assert f"{src}: line 1: row 0: id" not in r.stderr  # no prompt_id to name
    assert f"{src}: line 1: row 0: column prompt_id: missing field" in r.stderr
    assert "no row could be converted as ultrafeedback" in r.stderr
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    r = run_cli("convert", "--from", "kaggle", broken, "--out", out)
    assert r.returncode == 1 and f"{broken}: not a readable Parquet file" in r.stderr
    pretty = tmp_path / "one.json"
    pretty.write_text('{\n "question_id": "x"\n}\n')
    r = run_cli("convert", "--from", "chatbot-arena-conversations", pretty, "--out", out)
    assert r.returncode == 1 and f"{pretty}: line 1: expected a JSON array of records or JSON Lines" in r.stderr


def test_files_written_by_datasets_convert_like_hand_written_ones(tmp_path):
    """`datasets` is how users get these sets: its to_json (JSON Lines under a .json name) and to_parquet outputs."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ARENA_GOOD)
    ds.to_json(str(tmp_path / "hf.json"))
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    reference = tmp_path / "ref.csv"
    convert_file("chatbot-arena-conversations", write_jsonl(tmp_path / "ref.jsonl", ARENA_GOOD), reference)
    for name in ("hf.json", "hf.parquet"):
        out = tmp_path / f"{name}.csv"
        s = convert_file("chatbot-arena-conversations", tmp_path / name, out)
        assert (s.written, s.problem_rows) == (4, 0)
        assert out.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")


def test_kaggle_keeps_soft_labels_of_a_pseudo_labelled_file(tmp_path):
    """A pseudo-labelled file (winner columns holding probabilities) passes through with its soft labels."""
    src = tmp_path / "pseudo.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie"])
        w.writerow([1, '["hi"]', '["a"]', '["b"]', 0.7, 0.2, 0.1])
        w.writerow([2, '["yo"]', '["c"]', '["d"]', 0, 1, 0])
    out = tmp_path / "out.csv"
    r = run_cli("convert", "--from", "kaggle", src, "--out", out)
    assert r.returncode == 0 and "soft 1" in r.stdout, r.stdout + r.stderr
    a, b = read_battles(out)
    assert a.label is None and a.soft == pytest.approx((0.7, 0.2, 0.1)) and b.label == 1 and b.soft is None
