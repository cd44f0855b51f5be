"""Read and validate Kaggle competition CSVs (train.csv / test.csv).

`prompt`, `response_a`, `response_b` hold JSON-encoded lists of strings, one per turn. Real files contain JSON `null`
turns and lone UTF-16 surrogates, so every text goes through `clean_text`. Problems are collected as `Problem`s that
name the file, the row id and the column, so a CLI can print them all instead of a traceback.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

TEXT_COLUMNS = ("prompt", "response_a", "response_b")
LABEL_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
LABEL_NAMES = ("A", "B", "tie")  # class index 0, 1, 2 everywhere in the project
SWAP_CLASSES = (1, 0, 2)  # class i of a battle is class SWAP_CLASSES[i] of its A/B swap (a permutation, own inverse)
SOFT_TOLERANCE = 1e-4  # a soft label's three probabilities must sum to 1 within this


class DataError(ValueError):
    """A competition file cannot be used; `problems` lists every reason found."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems[:20]) + (f"\n... {len(problems)} problems in total" if len(problems) > 20 else ""))


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    row_id: str | None = None
    column: str | None = None
    line: int | None = None  # 1-based line of the CSV record (header is line 1)
    row: int | None = None  # 0-based record index in a JSON / Parquet input (the index pandas and datasets show)

    def __str__(self) -> str:
        where = [self.file]
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.row_id is not None:
            where.append(f"id {self.row_id}")
        if self.column is not None:
            where.append(f"column {self.column}")
        return f"{': '.join(where)}: {self.message}"


@dataclass(frozen=True)
class Battle:
    """One arena battle. `label` is 0 (A wins), 1 (B wins), 2 (tie) or None for test rows and soft rows.

    `soft` holds (pA, pB, pTie) when the winner columns carry probabilities instead of a one-hot label (a
    pseudo-labelled file): such a row has no hard label.
    """

    id: int | str
    prompt: tuple[str, ...]
    response_a: tuple[str, ...]
    response_b: tuple[str, ...]
    model_a: str | None = None
    model_b: str | None = None
    label: int | None = None
    soft: tuple[float, float, float] | None = None
    # Problems tolerated when reading leniently (inference must never drop a row).
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def n_turns(self) -> int:
        return len(self.prompt)


def clean_text(s: object) -> str:
    """Turn a JSON turn into valid UTF-8 text: null -> "", lone surrogates -> U+FFFD, split pairs re-joined."""
    if s is None:
        return ""
    if not isinstance(s, str):
        s = str(s)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        # Round-trip through UTF-16 joins surrogate pairs that JSON decoded separately and replaces lone ones.
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def parse_turns(cell: object) -> list[str]:
    """Parse one JSON-encoded turn list. Raises ValueError with a short reason."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        raise ValueError("empty cell")
    try:
        value = json.loads(cell)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"malformed JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if isinstance(value, str) or value is None:  # tolerate a bare string: it is one turn
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a JSON list of strings, got {type(value).__name__}")
    return [clean_text(t) for t in value]


def swap(b: Battle) -> Battle:
    """The same battle with A and B exchanged: responses, model names, label and soft label (tie stays tie)."""
    label = None if b.label is None else SWAP_CLASSES[b.label]
    soft = None if b.soft is None else swap_probs(b.soft)
    return replace(b, response_a=b.response_b, response_b=b.response_a, model_a=b.model_b, model_b=b.model_a,
                   label=label, soft=soft)


def swap_probs(p):
    """Class probabilities of the A/B-swapped battle (pA and pB exchanged); works on a triple or an (..., 3) array."""
    if isinstance(p, tuple):
        return tuple(p[c] for c in SWAP_CLASSES)
    return p[..., list(SWAP_CLASSES)]


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Raw CSV records as (line number, dict). Uses the csv module so multi-line quoted cells work and nothing is coerced."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError([Problem(str(path), f"cannot read file ({e.strerror})")]) from None
    if not raw.strip():
        raise DataError([Problem(str(path), "file is empty")])
    if b"\x00" in raw[:4096]:
        raise DataError([Problem(str(path), "not a CSV file (binary content)")])
    text = raw.decode("utf-8", errors="replace")
    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        rows = []
        for rec in reader:
            rows.append((reader.line_num, rec))
    except csv.Error as e:
        raise DataError([Problem(str(path), f"not a valid CSV ({e})", line=reader.line_num)]) from None
    return [h.strip().lstrip("\ufeff") for h in header], rows


def read_battles(path: str | Path, *, labels: bool | None = None, lenient: bool = False) -> list[Battle]:
    """Read a train.csv or test.csv.

    labels: True requires the three winner columns, False ignores them, None uses them when present.
    lenient: for inference. Row-level problems (bad JSON, turn count mismatch, bad labels) become `Battle.warnings`
    and the row is kept with whatever could be parsed; file-level problems (missing column, not a CSV, duplicate ids)
    still raise. In strict mode every problem is collected and raised together as `DataError`.
    """
    path = Path(path)
    name = str(path)
    header, rows = read_rows(path)
    problems: list[Problem] = []
    required = ["id", *TEXT_COLUMNS]
    has_labels = all(c in header for c in LABEL_COLUMNS)
    if labels:
        required += list(LABEL_COLUMNS)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError([Problem(name, f"missing column (header is: {','.join(header[:12])})", column=c) for c in missing])
    use_labels = has_labels if labels is None else labels
    if not rows:
        raise DataError([Problem(name, "no data rows")])

    battles: list[Battle] = []
    seen: dict[str, int] = {}
    for line, rec in rows:
        rid = (rec.get("id") or "").strip()
        row_problems: list[Problem] = []
        if not rid:
            row_problems.append(Problem(name, "empty id", column="id", line=line))
        elif rid in seen:
            problems.append(Problem(name, f"duplicate id (first seen on line {seen[rid]})", row_id=rid, column="id", line=line))
        else:
            seen[rid] = line
        turns = {}
        for col in TEXT_COLUMNS:
            try:
                turns[col] = parse_turns(rec.get(col))
            except ValueError as e:
                row_problems.append(Problem(name, str(e), row_id=rid, column=col, line=line))
                turns[col] = None
        counts = {c: len(t) for c, t in turns.items() if t is not None}
        if len(set(counts.values())) > 1:
            desc = ", ".join(f"{c}={n}" for c, n in counts.items())
            row_problems.append(Problem(name, f"turn lists have different lengths ({desc})", row_id=rid, column="response_a" if counts.get("response_a") != counts.get("prompt") else "response_b", line=line))
        label, soft = None, None
        if use_labels:
            label, soft, p = parse_label(rec, name, rid, line)
            if p:
                row_problems.append(p)
        if row_problems and not lenient:
            problems.extend(row_problems)
            continue
        n = max(counts.values(), default=1) or 1
        fixed = {c: tuple((t or []) + [""] * (n - len(t or []))) for c, t in turns.items()}
        battles.append(
            Battle(
                id=int(rid) if rid.lstrip("-").isdigit() else rid,
                prompt=fixed["prompt"],
                response_a=fixed["response_a"],
                response_b=fixed["response_b"],
                model_a=rec.get("model_a"),
                model_b=rec.get("model_b"),
                label=label,
                soft=soft,
                warnings=tuple(str(p) for p in row_problems),
            )
        )
    if problems:
        raise DataError(problems)
    return battles


def parse_label(rec: dict, name: str, rid: str, line: int) -> tuple[int | None, tuple | None, Problem | None]:
    """(hard label, soft triple, problem): one-hot rows are hard labels, probability triples summing to 1 are soft."""
    vals = []
    for c in LABEL_COLUMNS:
        v = (rec.get(c) or "").strip()
        try:
            f = float(v)
        except ValueError:
            return None, None, Problem(name, f"winner value {v!r} is not a number", row_id=rid, column=c, line=line)
        if not 0.0 <= f <= 1.0:  # also catches NaN
            return None, None, Problem(name, f"winner value {v!r} is not 0/1 or a probability in [0, 1]", row_id=rid,
                                       column=c, line=line)
        vals.append(f)
    if all(f in (0.0, 1.0) for f in vals) and sum(vals) == 1:
        return vals.index(1.0), None, None
    if all(f in (0.0, 1.0) for f in vals):
        return None, None, Problem(name, f"winner columns must hold exactly one 1, got {[int(f) for f in vals]}",
                                   row_id=rid, column="winner_model_a", line=line)
    total = math.fsum(vals)
    if abs(total - 1.0) > SOFT_TOLERANCE:
        return None, None, Problem(name, f"soft label probabilities must sum to 1, got {total:.6g} "
                                         f"({', '.join(f'{v:g}' for v in vals)})", row_id=rid, column="winner_tie",
                                   line=line)
    return None, tuple(f / total for f in vals), None


def validate(path: str | Path) -> tuple[int, list[Problem]]:
    """(rows read, problems) for a competition file; labels are checked when the winner columns are present."""
    try:
        return len(read_battles(path)), []
    except DataError as e:
        return 0, e.problems


def require_hard_labels(battles, name: str) -> None:
    """Refuse rows without a hard label (soft / pseudo-labelled rows) where a metric needs the true class."""
    soft = [b for b in battles if b.label is None]
    if soft:
        raise DataError([Problem(name, f"no hard label ({len(soft)} of {len(battles)} rows hold soft probabilities, "
                                       f"e.g. ids {', '.join(str(b.id) for b in soft[:5])}); scoring needs one-hot "
                                       "winner columns", row_id=str(soft[0].id), column="winner_model_a")])
