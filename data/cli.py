"""`arena-data`: validate, sample, score and describe competition files.

    arena-data validate train.csv                       exit 0 if valid, 1 with one line per problem
    arena-data sample --out data/sample --rows 2000     synthetic train/test/sample_submission in Kaggle format
    arena-data score --submission sub.csv --labels train.csv
    arena-data stats train.csv --tokenizer ../shared/tokenizers/llama3/tokenizer.model --max-length 2048
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

MAX_PROBLEMS_SHOWN = 50


def _validate(args) -> int:
    from .reading import DataError, read_battles

    try:
        battles, problems = read_battles(args.file), []
    except DataError as e:
        battles, problems = [], e.problems
    if not problems:
        soft = sum(b.soft is not None for b in battles)
        print(f"{args.file}: OK, {len(battles)} rows" + (f" ({soft} soft-labelled: probabilities, no hard label)" if soft else ""))
        return 0
    for p in problems[:MAX_PROBLEMS_SHOWN]:
        print(p)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        print(f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
    print(f"{args.file}: INVALID, {len(problems)} problem(s)")
    return 1


def _sample(args) -> int:
    from .synthetic import write_sample

    paths = write_sample(args.out, rows=args.rows, seed=args.seed, test_rows=args.test_rows, label_noise=args.label_noise)
    for name, p in paths.items():
        print(f"wrote {p}")
    return 0


def _score(args) -> int:
    from .scoring import score_submission

    r = score_submission(args.submission, args.labels)
    print(f"log_loss {r['log_loss']:.6f}  accuracy {r['accuracy']:.4f}  rows {r['rows']}  (uniform {r['uniform']:.4f})")
    return 0


def _stats(args) -> int:
    import numpy as np

    from .reading import LABEL_NAMES, read_battles

    battles = read_battles(args.file)
    n = len(battles)
    turns = np.array([b.n_turns for b in battles])
    print(f"{args.file}: {n} rows, turns mean {turns.mean():.2f} max {turns.max()} multi-turn {np.mean(turns > 1):.1%}")
    labels = [b.label for b in battles if b.label is not None]
    if labels:
        counts = np.bincount(labels, minlength=3)
        prior = counts / counts.sum()
        prior_ll = -float(np.sum(prior * np.log(np.clip(prior, 1e-15, 1))))
        shares = "  ".join(f"{name} {c} ({c / counts.sum():.1%})" for name, c in zip(LABEL_NAMES, counts))
        print(f"labels: {shares}  prior log loss {prior_ll:.4f} (uniform {math.log(3):.4f})")
    soft = np.array([b.soft for b in battles if b.soft is not None])
    if len(soft):
        mean = "  ".join(f"{name} {p:.3f}" for name, p in zip(LABEL_NAMES, soft.mean(axis=0)))
        print(f"soft labels (no hard label): {len(soft)} rows, mean probabilities {mean}")
    nulls = sum(t == "" for b in battles for t in (*b.response_a, *b.response_b))
    print(f"empty or null response turns: {nulls}")
    if not args.tokenizer:
        return 0
    from tqdm.auto import tqdm

    from .template import FormatConfig, Formatter
    from .tokenizer import load_tokenizer

    fmt = FormatConfig(max_length=args.max_length)
    f = Formatter(load_tokenizer(args.tokenizer), fmt)
    parts = {"prompt": [], "response_a": [], "response_b": [], "total": []}
    for s in tqdm(range(0, n, 256), desc="tokenizing", unit="batch", disable=not sys.stderr.isatty()):
        for t in f.tokenize(battles[s : s + 256]):
            parts["prompt"].append(sum(len(p) for p, _, _ in t))
            parts["response_a"].append(sum(len(a) for _, a, _ in t))
            parts["response_b"].append(sum(len(b) for _, _, b in t))
            parts["total"].append(f.full_lengths(t))
    qs = (50, 90, 95, 99, 100)
    print(f"tokens ({args.tokenizer}), percentiles " + " ".join(f"p{q}" for q in qs) + ", mean")
    for name, v in parts.items():
        arr = np.array(v)
        print(f"  {name:<11}" + " ".join(f"{int(np.percentile(arr, q)):>6}" for q in qs) + f" {arr.mean():8.1f}")
    total = np.array(parts["total"])
    print(f"truncated at max_length {args.max_length}: {np.mean(total > args.max_length):.1%} of rows")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arena-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a train.csv / test.csv; exit 1 listing every problem (file, line, id, column). "
                                        "Winner columns may hold one-hot labels or soft probabilities summing to 1")
    v.add_argument("file")
    v.set_defaults(func=_validate)
    s = sub.add_parser("sample", help="write synthetic train.csv, test.csv, sample_submission.csv in Kaggle format")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--rows", type=int, default=2000, help="train rows (default 2000)")
    s.add_argument("--test-rows", type=int, default=None, help="test rows (default rows/4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label-noise", type=float, default=0.10, metavar="P",
                   help="share of train.csv labels redrawn at random (default 0.10; 0 writes clean labels)")
    s.set_defaults(func=_sample)
    c = sub.add_parser("score", help="competition log loss (eps=auto) and accuracy of a submission")
    c.add_argument("--submission", required=True, help="submission.csv (id,winner_model_a,winner_model_b,winner_tie)")
    c.add_argument("--labels", required=True, help="a labelled CSV in train.csv format (hard, one-hot labels)")
    c.set_defaults(func=_score)
    t = sub.add_parser("stats", help="rows, turns, label balance, token-length percentiles, truncation rate")
    t.add_argument("file")
    t.add_argument("--tokenizer", help="tokenizer directory, tokenizer.json or tiktoken file (e.g. Llama 3 tokenizer.model)")
    t.add_argument("--max-length", type=int, default=2048, help="max_length for the truncation rate (default 2048)")
    t.set_defaults(func=_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    from .reading import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        for p in e.problems[:MAX_PROBLEMS_SHOWN]:
            print(p, file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"arena-data {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
