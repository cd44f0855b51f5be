"""Convert public preference datasets into the competition's train.csv format (`arena-data convert`).

Top LMSYS solutions added external battles to the 55k Kaggle rows. Three sources are read from local files:

- `chatbot-arena-conversations` (lmsys/chatbot_arena_conversations, 33k battles): `question_id`, `model_a`,
  `model_b`, `winner` in {model_a, model_b, tie, tie (bothbad)}, `conversation_a` / `conversation_b` lists of
  `{role, content}` that share the user turns.
- `ultrafeedback` (HuggingFaceH4/ultrafeedback_binarized, `*_prefs` splits): `prompt_id`, `chosen` / `rejected` lists
  of `{role, content}`; the chosen reply is placed as A or B by a seeded coin, so labels are balanced and never tie.
- `kaggle` (the competition's own columns, e.g. the 33k deduplicated LMSYS set): checked like `arena-data validate`
  and passed through, re-written canonically.

A conversation becomes turn lists: user messages are the `prompt` turns, the assistant reply to each is that turn's
response (a user turn without a reply gets "", as Kaggle's null turns do). External ids are not integers, so each
row gets a deterministic integer id (`stable_id`, outside Kaggle's id range) and keeps the source id in `source_id`.

The converters are pure: records in, `Converted` rows or `Problem`s out. Reading files and writing the CSV are the
edges (`iter_records`, `convert_file`). A row that cannot be converted is never silently dropped: it becomes a
`Problem` naming file, row (and line), id and column.
"""
from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .atomic import atomic_path
from .reading import LABEL_COLUMNS, TEXT_COLUMNS, Battle, DataError, Problem, parse_label, read_rows, clean_text, parse_turns

FORMATS = ("chatbot-arena-conversations", "ultrafeedback", "kaggle")
OUTPUT_COLUMNS = ("id", "model_a", "model_b", *TEXT_COLUMNS, *LABEL_COLUMNS, "source_id")
ID_COLUMN = {"chatbot-arena-conversations": "question_id", "ultrafeedback": "prompt_id", "kaggle": "id"}
# Columns a converter reads; Parquet inputs load only these (the arena set's moderation structs are most of its bytes).
NEEDED_COLUMNS = {
    "chatbot-arena-conversations": ("question_id", "model_a", "model_b", "winner", "conversation_a", "conversation_b"),
    "ultrafeedback": ("prompt_id", "chosen", "rejected"),
    "kaggle": ("id", "model_a", "model_b", *TEXT_COLUMNS, *LABEL_COLUMNS, "source_id"),
}
WINNERS = {"model_a": 0, "model_b": 1, "tie": 2, "tie (bothbad)": 2}
# Generated ids start above every Kaggle id (< 2**32) and stay below 2**53, so a float64 reader keeps them exact.
ID_BASE = 10**12
ID_SPAN = 2**53 - ID_BASE


class UsageError(ValueError):
    """The command line cannot work (unknown suffix, missing input): exit status 2."""


class RowError(ValueError):
    """One record cannot be converted; `column` names the field at fault."""

    def __init__(self, column: str | None, message: str):
        self.column = column
        super().__init__(message)


class ConversionFailed(DataError):
    """--strict saw a problem, or no row converted; nothing was written. `summary` has the counts."""

    def __init__(self, problems: list[Problem], summary: "Summary"):
        super().__init__(problems)
        self.summary = summary


@dataclass(frozen=True)
class Record:
    """One raw input record and where it came from."""

    file: str
    index: int  # 0-based position of the record in `file` (the index pandas / datasets show)
    data: object = None  # the parsed record (a dict when well-formed)
    line: int | None = None  # 1-based line for CSV and JSON Lines inputs
    error: str | None = None  # set when the record itself could not be parsed (a malformed JSON line)


@dataclass(frozen=True)
class Converted:
    """A battle ready to write, with the id it had in the source dataset."""

    battle: Battle
    source_id: str


@dataclass
class Summary:
    """What a conversion did: counts, label balance and the first problems (all problem rows are counted)."""

    records: int = 0
    written: int = 0
    problem_rows: int = 0
    problems: list[Problem] = field(default_factory=list)  # the first `max_problems`
    by_column: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)


# ---------------------------------------------------------------------------------------------------------- pure parts


def stable_id(fmt: str, source_id: str) -> int:
    """A deterministic integer id for a source id: the same row gets the same id whatever the file order or --limit."""
    digest = hashlib.sha256(f"{fmt}:{source_id}".encode("utf-8")).digest()
    return ID_BASE + int.from_bytes(digest[:8], "big") % ID_SPAN


def chosen_is_a(seed: int, source_id: str) -> bool:
    """The seeded coin for UltraFeedback: True puts the chosen reply in A. Per row, so it does not depend on order."""
    return hashlib.sha256(f"{seed}:{source_id}".encode("utf-8")).digest()[0] & 1 == 1


def _field(rec: dict, column: str) -> object:
    if column not in rec:
        raise RowError(column, "missing field")
    value = rec[column]
    if value is None:
        raise RowError(column, "is null")
    return value


def _string_field(rec: dict, column: str) -> str:
    value = _field(rec, column)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(column, f"expected a string, got {type(value).__name__}")
    return str(value)


def split_conversation(messages: object, column: str) -> tuple[list[str], list[str]]:
    """(user turns, assistant replies) of an OpenAI-style message list. Raises RowError naming `column`.

    Roles must alternate from a user turn; a last user turn without a reply gets "" (a Kaggle null turn). Empty
    content is data; a non-string content, an unknown role or an empty list is an error.
    """
    if not isinstance(messages, (list, tuple)):
        raise RowError(column, f"expected a list of {{role, content}} messages, got {type(messages).__name__}")
    if not messages:
        raise RowError(column, "empty conversation")
    users: list[str] = []
    replies: list[str | None] = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(column, f"message {k} is {type(m).__name__}, not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise RowError(column, f"message {k} content is {type(content).__name__}, not a string")
        if role == "user":
            if replies and replies[-1] is None:
                raise RowError(column, f"message {k}: two user messages in a row")
            users.append(clean_text(content))
            replies.append(None)
        elif role == "assistant":
            if not replies or replies[-1] is not None:
                raise RowError(column, f"message {k}: assistant message without a user message before it")
            replies[-1] = clean_text(content)
        else:
            raise RowError(column, f"message {k} has role {role!r} (expected 'user' or 'assistant')")
    return users, ["" if r is None else r for r in replies]


def _paired_turns(rec: dict, col_a: str, col_b: str) -> tuple[list[str], list[str], list[str]]:
    """prompt, response A, response B turn lists from two conversations that must share their user turns."""
    users_a, replies_a = split_conversation(_field(rec, col_a), col_a)
    users_b, replies_b = split_conversation(_field(rec, col_b), col_b)
    if len(users_a) != len(users_b):
        raise RowError(col_b, f"{len(users_b)} user turns, {col_a} has {len(users_a)}")
    for k, (ua, ub) in enumerate(zip(users_a, users_b)):
        if ua != ub:
            raise RowError(col_b, f"user turn {k} differs from {col_a}")
    return users_a, replies_a, replies_b


def arena_conversation_row(rec: dict, seed: int = 0) -> Converted:
    """One lmsys/chatbot_arena_conversations record -> Converted. Raises RowError."""
    qid = _string_field(rec, "question_id")
    model_a, model_b = _string_field(rec, "model_a"), _string_field(rec, "model_b")
    winner = _field(rec, "winner")
    if winner not in WINNERS:
        raise RowError("winner", f"unknown winner {winner!r} (expected one of {', '.join(WINNERS)})")
    prompt, ra, rb = _paired_turns(rec, "conversation_a", "conversation_b")
    battle = Battle(stable_id("chatbot-arena-conversations", qid), tuple(prompt), tuple(ra), tuple(rb), model_a, model_b, WINNERS[winner])
    return Converted(battle, qid)


def ultrafeedback_row(rec: dict, seed: int = 0) -> Converted:
    """One HuggingFaceH4/ultrafeedback_binarized record -> Converted, chosen in A or B by `chosen_is_a`.

    `chosen` and `rejected` hold the whole conversation (user prompt, earlier turns, final reply); earlier turns
    are shared context and stay as earlier turns, so only the last replies differ between A and B.
    """
    pid = _string_field(rec, "prompt_id")
    prompt, chosen, rejected = _paired_turns(rec, "chosen", "rejected")
    if chosen_is_a(seed, pid):
        ra, rb, label = chosen, rejected, 0
    else:
        ra, rb, label = rejected, chosen, 1
    return Converted(Battle(stable_id("ultrafeedback", pid), tuple(prompt), tuple(ra), tuple(rb), "", "", label), pid)


def _kaggle_turns(value: object, column: str) -> list[str]:
    if isinstance(value, str):
        try:
            return parse_turns(value)
        except ValueError as e:
            raise RowError(column, str(e)) from None
    if isinstance(value, (list, tuple)):  # JSON / Parquet copies hold real lists
        return [clean_text(t) for t in value]
    raise RowError(column, f"expected a JSON-encoded list of strings, got {type(value).__name__}")


def kaggle_row(rec: dict, seed: int = 0) -> Converted:
    """One record in the competition's own columns -> Converted (checked like `read_battles`). Raises RowError."""
    rid = _string_field(rec, "id").strip()
    if not rid:
        raise RowError("id", "empty id")
    turns = {c: _kaggle_turns(_field(rec, c), c) for c in TEXT_COLUMNS}
    counts = {c: len(t) for c, t in turns.items()}
    if len(set(counts.values())) > 1:
        desc = ", ".join(f"{c}={n}" for c, n in counts.items())
        bad = "response_a" if counts["response_a"] != counts["prompt"] else "response_b"
        raise RowError(bad, f"turn lists have different lengths ({desc})")
    if counts["prompt"] == 0:
        raise RowError("prompt", "empty conversation (no turns)")
    for c in LABEL_COLUMNS:
        _field(rec, c)
    label, soft, problem = parse_label({c: str(rec[c]) for c in LABEL_COLUMNS}, "", rid, 0)
    if problem:
        raise RowError(problem.column, problem.message)
    models = [clean_text(rec.get(c)) for c in ("model_a", "model_b")]
    source = rec.get("source_id")  # a file this command wrote keeps its original source ids
    source_id = clean_text(source).strip() if isinstance(source, (str, int)) and str(source).strip() else rid
    battle = Battle(int(rid) if rid.lstrip("-").isdigit() else rid, tuple(turns["prompt"]), tuple(turns["response_a"]),
                    tuple(turns["response_b"]), models[0], models[1], label, soft=soft)  # soft: a pseudo-labelled file
    return Converted(battle, source_id)


CONVERTERS: dict[str, Callable[[dict, int], Converted]] = {
    "chatbot-arena-conversations": arena_conversation_row,
    "ultrafeedback": ultrafeedback_row,
    "kaggle": kaggle_row,
}


def _source_id(data: object, column: str) -> str | None:
    if isinstance(data, dict) and isinstance(data.get(column), (str, int)) and not isinstance(data.get(column), bool):
        return str(data[column])
    return None


def convert_records(fmt: str, records: Iterable[Record], seed: int = 0) -> Iterator[Converted | Problem]:
    """Yield each record converted, or a Problem naming file, row/line, id and column. Duplicate ids are problems
    (the first occurrence is kept)."""
    if fmt not in CONVERTERS:
        raise UsageError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    convert, id_column = CONVERTERS[fmt], ID_COLUMN[fmt]
    first_seen: dict[object, tuple[str, int]] = {}  # id -> (file, row) of its first occurrence
    for r in records:
        where = dict(line=r.line, row=r.index)
        if r.error is not None:
            yield Problem(r.file, r.error, **where)
            continue
        if not isinstance(r.data, dict):
            yield Problem(r.file, f"record is {type(r.data).__name__}, not an object with named fields", **where)
            continue
        try:
            out = convert(r.data, seed)
        except RowError as e:
            yield Problem(r.file, str(e), row_id=_source_id(r.data, id_column), column=e.column, **where)
            continue
        if out.battle.id in first_seen:
            file, row = first_seen[out.battle.id]
            at = f"row {row}" if file == r.file else f"{file} row {row}"
            yield Problem(r.file, f"duplicate id (first seen at {at})", row_id=_source_id(r.data, id_column),
                          column=id_column, **where)
            continue
        first_seen[out.battle.id] = (r.file, r.index)
        yield out


def dump_turns(turns: Iterable[str]) -> str:
    """A turn list encoded like the Kaggle files: compact JSON, non-ASCII as \\u escapes."""
    return json.dumps(list(turns), separators=(",", ":"))


def output_row(c: Converted) -> list[object]:
    """The CSV cells of one converted battle, in OUTPUT_COLUMNS order."""
    b = c.battle
    winner = [repr(float(p)) for p in b.soft] if b.soft is not None else [int(b.label == k) for k in range(3)]
    return [b.id, b.model_a or "", b.model_b or "", dump_turns(b.prompt), dump_turns(b.response_a), dump_turns(b.response_b),
            *winner, c.source_id]


# ----------------------------------------------------------------------------------------------------------- the edges


def input_files(path: Path) -> list[Path]:
    """The files behind INPUT: the file itself, or the sorted .parquet shards of a directory. Raises UsageError."""
    if path.is_dir():
        shards = sorted(path.rglob("*.parquet"))
        if not shards:
            raise UsageError(f"{path}: directory holds no .parquet shards")
        return shards
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    return [path]


def _check_suffix(path: Path, fmt: str) -> str:
    suffix = path.suffix.lower()
    allowed = (".json", ".jsonl", ".parquet") + ((".csv",) if fmt == "kaggle" else ())
    if suffix not in allowed:
        raise UsageError(f"{path}: cannot read {suffix or 'a file without suffix'} for --from {fmt} (expected {', '.join(allowed)})")
    return suffix


def _json_lines(path: Path, first_index: int = 0) -> Iterator[Record]:
    """Stream a JSON Lines file; a malformed line is a Record with `error` (the rest is still read)."""
    name, index = str(path), first_index
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                data, error = json.loads(text.rstrip("\r\n")), None
            except json.JSONDecodeError as e:
                data, error = None, f"malformed JSON line ({e.msg} at column {e.colno})"
            yield Record(name, index, data, line=lineno, error=error)
            index += 1


def _json_file(path: Path) -> Iterator[Record]:
    """A .json file: a JSON array of records, or JSON Lines (what `datasets.Dataset.to_json` writes by default)."""
    name = str(path)
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if not head:
        raise DataError([Problem(name, "file is empty")])
    if not head.startswith(b"["):
        first = head.split(b"\n", 1)[0]
        try:
            json.loads(first)
        except json.JSONDecodeError:
            raise DataError([Problem(name, "expected a JSON array of records or JSON Lines (one object per line)", line=1)]) from None
        yield from _json_lines(path)
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        raise DataError([Problem(name, f"not valid JSON ({e.msg})", line=e.lineno)]) from None
    for i, rec in enumerate(data):
        yield Record(name, i, rec)


def _parquet_file(path: Path, columns: Iterable[str]) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("reading Parquet needs pyarrow: pip install -e '.[train]' (or pip install pyarrow)") from None
    import pyarrow as pa

    name = str(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError([Problem(name, f"not a readable Parquet file ({e})")]) from None
    present = [c for c in columns if c in pf.schema_arrow.names]  # an absent column is reported per row
    index = 0
    for batch in pf.iter_batches(batch_size=1024, columns=present):
        for rec in batch.to_pylist():
            yield Record(name, index, rec)
            index += 1


def _csv_file(path: Path) -> Iterator[Record]:
    header, rows = read_rows(path)
    for i, (line, rec) in enumerate(rows):
        yield Record(str(path), i, {k.strip().lstrip("\ufeff"): v for k, v in rec.items() if k is not None}, line=line)


def iter_records(path: str | Path, fmt: str) -> Iterator[Record]:
    """Every record of INPUT (a file or a directory of Parquet shards), streamed where the format allows.

    Raises UsageError for a path or suffix that cannot work, DataError for a file that cannot be read at all.
    """
    for f in input_files(Path(path)):
        suffix = _check_suffix(f, fmt)
        if suffix == ".jsonl":
            yield from _json_lines(f)
        elif suffix == ".json":
            yield from _json_file(f)
        elif suffix == ".parquet":
            yield from _parquet_file(f, NEEDED_COLUMNS[fmt])
        else:
            yield from _csv_file(f)


def count_records(path: str | Path) -> int | None:
    """Rows in the input when cheap to know (Parquet metadata), for the progress bar; None otherwise."""
    files = input_files(Path(path))
    if not all(f.suffix.lower() == ".parquet" for f in files):
        return None
    try:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except Exception:  # noqa: BLE001 - only a progress-bar total; iter_records reports the real error
        return None


def convert_file(fmt: str, input_path: str | Path, out_path: str | Path, *, seed: int = 0, limit: int | None = None,
                 strict: bool = False, max_problems: int = 50, progress: bool = False) -> Summary:
    """Convert INPUT to a train.csv at `out_path`, written atomically (temp file + rename).

    Rows with problems are skipped, counted and the first `max_problems` kept in the summary. With `strict`, any
    problem raises DataError and nothing is written; so does an input where no row converts.
    """
    from tqdm.auto import tqdm

    if fmt not in CONVERTERS:
        raise UsageError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    input_path, out_path = Path(input_path), Path(out_path)
    files = input_files(input_path)
    if out_path.resolve() in {f.resolve() for f in files}:
        raise UsageError(f"{out_path}: the output would overwrite the input")
    total = count_records(input_path)
    total = min(total, limit) if total is not None and limit is not None else (total or limit)
    summary = Summary()

    def counted(records: Iterable[Record]) -> Iterator[Record]:
        for r in records:
            summary.records += 1
            yield r

    records = counted(iter_records(input_path, fmt))
    if limit is not None:
        records = islice(records, limit)
    with atomic_path(out_path) as tmp:  # an error (or --strict) leaves no partial output
        with tmp.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(OUTPUT_COLUMNS)
            for item in tqdm(convert_records(fmt, records, seed), total=total, desc=f"converting {fmt}", unit="row",
                             disable=not progress):
                if isinstance(item, Problem):
                    summary.problem_rows += 1
                    summary.by_column[item.column or "(record)"] += 1
                    if len(summary.problems) < max_problems:
                        summary.problems.append(item)
                    continue
                writer.writerow(output_row(item))
                summary.written += 1
                summary.labels[item.battle.label] += 1
        if summary.records == 0:
            raise DataError([Problem(str(input_path), "no records")])
        if strict and summary.problem_rows:
            raise ConversionFailed(summary.problems, summary)
        if summary.written == 0:
            raise ConversionFailed([*summary.problems, Problem(str(input_path), f"no row could be converted as {fmt}")], summary)
    return summary
