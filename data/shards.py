"""Score a large file in slices (`arena-predict --shard K/N`) and join the slices (`arena-data merge`).

Shard K of N (K counted from 0) is the contiguous slice rows[K*n//N : (K+1)*n//N] of the file: slices differ in
size by at most one row and concatenating shards 0..N-1 gives back the file's order. Next to each shard's output
arena-predict writes a sidecar `OUT.shard.json` {"shard", "of", "rows", "first_row", "test_rows", "test",
"test_sha256"}, so `merge` can tell a missing shard, a shard of another file, or a shard run with a different N,
without being given the test file; with `--test` it also checks every id of that file against the shards.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .reading import DataError, Problem

SIDECAR_SUFFIX = ".shard.json"


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N. Raises ValueError with the reason (a usage error)."""
    k, sep, n = str(text).partition("/")
    try:
        k_i, n_i = int(k), int(n)
    except ValueError:
        raise ValueError(f"--shard must be K/N with integers, 0 <= K < N (e.g. 0/4), got {text!r}") from None
    if not sep or n_i < 1 or not 0 <= k_i < n_i:
        raise ValueError(f"--shard must be K/N with 0 <= K < N (shards count from 0), got {text!r}")
    return k_i, n_i


def shard_bounds(rows: int, shard: int, of: int) -> tuple[int, int]:
    """[start, stop) of shard `shard` of `of` over `rows` rows (contiguous, sizes differ by at most one)."""
    return shard * rows // of, (shard + 1) * rows // of


def sidecar_path(out: str | Path) -> Path:
    return Path(str(out) + SIDECAR_SUFFIX)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar(shard: int, of: int, test_rows: int, test: str | Path, test_sha256: str) -> dict:
    start, stop = shard_bounds(test_rows, shard, of)
    return {"shard": shard, "of": of, "rows": stop - start, "first_row": start, "test_rows": test_rows,
            "test": str(test), "test_sha256": test_sha256}


def write_sidecar(out: str | Path, info: dict) -> Path:
    """Atomically write the sidecar of shard output `out`."""
    from .atomic import write_atomic

    path = sidecar_path(out)
    write_atomic(path, json.dumps(info, indent=1) + "\n")
    return path


def read_sidecar(shard_file: str | Path) -> dict | None:
    """The sidecar of a shard file, None when there is none. Raises DataError when it is unreadable."""
    path = sidecar_path(shard_file)
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        for key in ("shard", "of", "rows", "test_rows", "test_sha256"):
            info[key]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError([Problem(str(path), f"not a shard sidecar written by arena-predict --shard ({e!r})")]) from None
    return info


@dataclass
class Shard:
    path: str
    ids: list
    probs: np.ndarray
    info: dict | None  # the sidecar


def merge_shards(shards: Sequence[Shard], test_ids: Sequence | None = None, test_sha256: str | None = None,
                 test_name: str = "--test") -> tuple[list, np.ndarray]:
    """(ids, probabilities) of the joined shards, refusing overlaps and gaps. Raises DataError naming the files.

    Order: the test file's when `test_ids` is given, else the shards' order by sidecar index (= the scored
    file's order). Without `test_ids` every shard needs its sidecar, otherwise a missing shard could not be seen.
    """
    problems: list[Problem] = []
    owner: dict[str, str] = {}
    for s in shards:
        for rid in s.ids:
            key = str(rid)
            if key in owner:
                problems.append(Problem(s.path, f"id also in {owner[key]} (overlapping shards)", row_id=key, column="id"))
                if len(problems) >= 10:
                    raise DataError(problems)
            else:
                owner[key] = s.path
    if problems:
        raise DataError(problems)

    infos = [s.info for s in shards]
    if any(i is not None for i in infos):
        problems += _check_sidecars(shards, test_sha256, test_name)
    elif test_ids is None:
        raise DataError([Problem(shards[0].path, f"no sidecar {SIDECAR_SUFFIX} (written by arena-predict --shard), "
                                 "so a missing shard cannot be detected: give --test with the scored file")])
    if problems:
        raise DataError(problems)

    rows = {str(rid): (i, j) for i, s in enumerate(shards) for j, rid in enumerate(s.ids)}
    if test_ids is not None:
        want = [str(t) for t in test_ids]
        missing = [t for t in want if t not in rows]
        extra = sorted(set(rows) - set(want))
        if missing:
            problems.append(Problem(test_name, f"{len(missing)} id(s) are in no shard, e.g. {missing[:5]}", column="id"))
        for key in extra[:5]:
            problems.append(Problem(shards[rows[key][0]].path, f"id is not in {test_name}", row_id=key, column="id"))
        if problems:
            raise DataError(problems)
        ids = list(test_ids)
        order = [rows[t] for t in want]
    else:
        by_index = sorted(range(len(shards)), key=lambda i: shards[i].info["shard"])
        order = [(i, j) for i in by_index for j in range(len(shards[i].ids))]
        ids = [shards[i].ids[j] for i, j in order]
    probs = np.stack([shards[i].probs[j] for i, j in order]) if order else np.zeros((0, 3))
    return ids, probs


def _check_sidecars(shards: Sequence[Shard], test_sha256: str | None, test_name: str) -> list[Problem]:
    """Every shard has a sidecar; all name the same file and N; indices 0..N-1 each once; row counts match."""
    problems = []
    missing = [s.path for s in shards if s.info is None]
    for p in missing:
        problems.append(Problem(p, f"no sidecar {SIDECAR_SUFFIX} while the other shards have one"))
    if missing:
        return problems
    first = shards[0]
    seen: dict[int, str] = {}
    for s in shards:
        i = s.info
        if i["of"] != first.info["of"] or i["test_sha256"] != first.info["test_sha256"]:
            problems.append(Problem(s.path, f"shard {i['shard']}/{i['of']} of a file with sha256 {i['test_sha256'][:12]} "
                                    f"does not match {first.path} (shard {first.info['shard']}/{first.info['of']}, "
                                    f"sha256 {first.info['test_sha256'][:12]}): shards of different runs"))
            continue
        if test_sha256 is not None and i["test_sha256"] != test_sha256:
            problems.append(Problem(s.path, f"scored a file with sha256 {i['test_sha256'][:12]}, not {test_name} "
                                    f"(sha256 {test_sha256[:12]})"))
        if i["shard"] in seen:
            problems.append(Problem(s.path, f"shard {i['shard']}/{i['of']} given twice (also {seen[i['shard']]})"))
        seen[i["shard"]] = s.path
        if len(s.ids) != i["rows"]:
            problems.append(Problem(s.path, f"{len(s.ids)} rows, but shard {i['shard']}/{i['of']} of "
                                    f"{i['test_rows']} rows has {i['rows']} (incomplete or edited file)"))
    if not problems:
        n = first.info["of"]
        absent = [k for k in range(n) if k not in seen]
        if absent:
            problems.append(Problem(first.path, f"shard(s) {', '.join(f'{k}/{n}' for k in absent)} missing "
                                    f"({len(seen)} of {n} given)"))
    return problems
