"""`arena-data`: validate, sample, score and describe competition files.

    arena-data validate train.csv                       exit 0 if valid, 1 with one line per problem
    arena-data sample --out data/sample --rows 2000     synthetic train/test/sample_submission in Kaggle format
    arena-data score --submission sub.csv --labels train.csv
    arena-data stats train.csv --tokenizer ../shared/tokenizers/llama3/tokenizer.model --max-length 2048
    arena-data convert --from chatbot-arena-conversations arena.parquet --out external.csv
    arena-data oof runs/fold0 runs/fold1 runs/fold2 runs/fold3 runs/fold4 --out oof.csv
    arena-data merge probs.0.csv probs.1.csv --out probs.csv [--test extra.csv]
    arena-data pseudo-label --data extra.csv --predictions probs.csv --out labelled.csv --exclude train.csv
    arena-data blend --labels train.csv --predictions oof_a.csv oof_b.csv
    arena-data blend --predictions sub_a.csv sub_b.csv --weights 0.7,0.3 --out blend.csv
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

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


def _print_problems(summary, args, file) -> None:
    for p in summary.problems:
        print(p, file=file)
    if summary.problem_rows > len(summary.problems):
        print(f"... and {summary.problem_rows - len(summary.problems)} more", file=file)
    if summary.problem_rows:
        cols = ", ".join(f"{c} {n}" for c, n in summary.by_column.most_common())
        print(f"{args.input}: {summary.problem_rows} row(s) could not be converted (by column: {cols})", file=file)


def _convert(args) -> int:
    from .convert import ConversionFailed, UsageError, convert_file
    from .reading import LABEL_NAMES

    if args.limit is not None and args.limit < 1:
        print("arena-data convert: error: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        summary = convert_file(args.fmt, args.input, args.out, seed=args.seed, limit=args.limit, strict=args.strict,
                               max_problems=MAX_PROBLEMS_SHOWN, progress=sys.stderr.isatty())
    except UsageError as e:
        print(f"arena-data convert: error: {e}", file=sys.stderr)
        return 2
    except ConversionFailed as e:
        _print_problems(e.summary, args, sys.stderr)
        if e.problems and e.problems[-1] not in e.summary.problems:
            print(e.problems[-1], file=sys.stderr)
        print(f"{args.input}: FAILED, {e.summary.records} records read, {e.summary.problem_rows} with problems, "
              f"nothing written{' (--strict)' if args.strict else ''}", file=sys.stderr)
        return 1
    _print_problems(summary, args, sys.stderr)
    labels = "  ".join(f"{name} {summary.labels[k]}" for k, name in enumerate(LABEL_NAMES))
    if summary.labels[None]:
        labels += f"  soft {summary.labels[None]}"
    print(f"wrote {args.out}: {summary.written} rows from {summary.records} records read as {args.fmt}, "
          f"{summary.problem_rows} skipped  (labels: {labels})")
    return 0


def _oof(args) -> int:
    from inference.submission import write_submission

    from .oof import check_compatible, join_oof, load_run
    from .reading import DataError, Problem, read_battles
    from .scoring import log_loss

    runs = [load_run(d) for d in args.run_dirs]
    check_compatible(runs)
    train = args.train or runs[0].train_csv
    if not Path(train).is_file():
        raise DataError([Problem(str(Path(runs[0].run_dir) / "config.yaml"), f"training file {train!r} not found "
                                 "(runs trained elsewhere: give --train)", column="data.train_csv")])
    battles = read_battles(train)
    ids = [b.id for b in battles]
    probs = join_oof(runs, ids, train)
    write_submission(args.out, ids, probs, np.full(3, 1.0 / 3.0))
    for r in sorted(runs, key=lambda r: r.valid_fold):
        print(f"{r.run_dir}: fold {r.valid_fold} of {r.num_folds}, {len(r.ids)} rows")
    labels = [b.label for b in battles]
    score = f"; log loss {log_loss(probs, np.array(labels)):.4f}" if None not in labels else ""
    print(f"wrote {args.out}: {len(ids)} rows of {train}, each predicted by the run that held its fold out{score}")
    return 0


def _merge(args) -> int:
    from inference.submission import write_submission

    from .reading import read_battles
    from .scoring import read_probabilities
    from .shards import Shard, file_sha256, merge_shards, read_sidecar

    shards = [Shard(str(p), *read_probabilities(p), read_sidecar(p)) for p in args.shards]
    test_ids = sha = None
    if args.test:
        test_ids = [b.id for b in read_battles(args.test, lenient=True)]
        sha = file_sha256(args.test)
    ids, probs = merge_shards(shards, test_ids, sha, args.test or "--test")
    write_submission(args.out, ids, probs, np.full(3, 1.0 / 3.0))
    for sh in shards:
        where = f"shard {sh.info['shard']}/{sh.info['of']}" if sh.info else "no sidecar"
        print(f"{sh.path}: {len(sh.ids)} rows ({where})")
    order = f"in {args.test} order, every id present" if args.test else "in shard order, no shard missing"
    print(f"wrote {args.out}: {len(ids)} rows from {len(shards)} shard(s), {order}")
    return 0


def _pseudo_label(args) -> int:
    from .atomic import write_atomic
    from .pseudo import align_predictions, battle_keys, raw_rows, render, select
    from .reading import DataError, Problem, read_battles
    from .scoring import read_probabilities

    if not 0.0 <= args.min_confidence <= 1.0:
        args._parser.error(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    battles = read_battles(args.data, labels=False)
    header, records = raw_rows(args.data)
    probs, unused = align_predictions(battles, *read_probabilities(args.predictions), args.predictions)
    excluded: set[str] = set()
    for path in args.exclude:
        excluded |= battle_keys(read_battles(path, labels=False))
    sel = select(battles, probs, args.min_confidence, excluded)
    kept = int(sel.keep.sum())
    print(f"{args.data}: {len(battles)} rows read")
    if unused:
        print(f"{args.predictions}: {unused} predicted id(s) are not in {args.data} (ignored)")
    print(f"dropped {sel.low_confidence} below --min-confidence {args.min_confidence:g}")
    where = ", ".join(args.exclude) or "(no --exclude)"
    print(f"dropped {sel.excluded} also in {where} (same texts, either A/B order)")
    if kept == 0:
        raise DataError([Problem(args.data, f"no row is left to write ({sel.low_confidence} below "
                                 f"--min-confidence, {sel.excluded} excluded); nothing written")])
    records = [r for r, k in zip(records, sel.keep) if k]
    write_atomic(args.out, render(header, records, probs[sel.keep]))
    print(f"wrote {args.out}: {kept} rows with soft labels")
    return 0


def _blend(args) -> int:
    import json

    from inference.submission import write_submission

    from .blend import align, blend, fit_temperature, fit_weights, parse_weights
    from .reading import read_battles, require_hard_labels
    from .scoring import log_loss, read_probabilities

    err = args._parser.error
    if args.weights is None and not args.labels:
        err("give --labels to fit weights, or --weights (with --out) to apply them")
    if args.weights is None and args.out:
        err("--out needs --weights: fit on labelled (out-of-fold) predictions first, then apply the printed "
            "weights to the test predictions")
    if args.weights is not None and not (args.out or args.labels):
        err("--weights needs --out (write the blend) or --labels (score it)")
    if args.fit_temperature and args.temperature is not None:
        err("--fit-temperature and --temperature exclude each other")
    if args.temperature is not None and not args.temperature > 0:
        err(f"--temperature must be positive, got {args.temperature}")
    weights = None
    if args.weights is not None:
        try:
            weights = parse_weights(args.weights)
        except ValueError as e:
            err(str(e))
        if len(weights) != len(args.predictions):
            err(f"--weights has {len(weights)} values for {len(args.predictions)} --predictions files")
    files = [(str(p), *read_probabilities(p)) for p in args.predictions]

    if args.out:
        ids = files[0][1]
        rows = align(files, ids, files[0][0], exact=True)
        out = blend(rows, weights, args.temperature or 1.0)
        write_submission(args.out, ids, out, np.full(3, 1.0 / 3.0))
        print(f"wrote {args.out}: {len(ids)} rows, weights {[round(w / sum(weights), 6) for w in weights]}"
              + (f", temperature {args.temperature:g}" if args.temperature else ""))
        if not args.labels:
            return 0

    battles = read_battles(args.labels, labels=True)
    require_hard_labels(battles, str(args.labels))  # weights are fitted to true classes, not to soft labels
    y = np.array([b.label for b in battles])
    rows = align(files, [b.id for b in battles], args.labels, exact=False)
    single = [log_loss(r, y) for r in rows]
    if weights is None:
        fit = fit_weights(rows, y)
        w = fit.weights
        how = f"fitted in {fit.iterations} iterations (duality gap {fit.gap:.1e})"
    else:
        w = np.asarray(weights) / sum(weights)
        how = "given"
    plain = log_loss(blend(rows, w), y)
    t = args.temperature or (fit_temperature(blend(rows, w), y) if args.fit_temperature else 1.0)
    final = log_loss(blend(rows, w, t), y)
    print(f"{len(y)} labelled rows of {args.labels}")
    labelled = {str(b.id) for b in battles}
    for (name, fids, _), s, wi in zip(files, single, w):
        extra = sum(str(i) not in labelled for i in fids)
        print(f"  {name}: log loss {s:.4f}, weight {wi:.4f}" + (f" ({extra} unlabelled ids ignored)" if extra else ""))
    print(f"blend ({how}): log loss {plain:.4f}" + (f"; at temperature {t:.4f}: {final:.4f}" if t != 1.0 else ""))
    print(json.dumps({"weights": [round(float(x), 6) for x in w], "log_loss": round(final, 6),
                      "single": [round(s, 6) for s in single], "temperature": round(float(t), 6),
                      "log_loss_no_temperature": round(plain, 6), "rows": int(len(y))}))
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
    from .convert import FORMATS

    cv = sub.add_parser(
        "convert", help="convert an external preference dataset (arena conversations, UltraFeedback, Kaggle) to train.csv",
        description="Convert a local copy of a public preference dataset into the competition's train.csv format "
        "(JSON turn lists, one-hot winner columns), ready for `arena-data validate` and training. "
        "Formats: chatbot-arena-conversations (lmsys/chatbot_arena_conversations), ultrafeedback "
        "(HuggingFaceH4/ultrafeedback_binarized, a *_prefs split; the chosen reply goes to A or B by a seeded coin, "
        "so there are no ties), kaggle (the competition's own columns, checked and passed through). External rows get "
        "deterministic integer ids (>= 10**12) and keep their own id in a source_id column. By default rows that "
        "cannot be converted are skipped, counted and named (file, row, id, column) and the command exits 0; "
        "--strict makes any such row an error (exit 1, nothing written). Exit 2: bad options or paths.")
    cv.add_argument("input", help="a .json (array or JSON Lines), .jsonl or .parquet file (.csv for --from kaggle), "
                    "or a directory of .parquet shards")
    cv.add_argument("--from", dest="fmt", required=True, choices=FORMATS, metavar="FORMAT",
                    help=f"the input's dataset format: {', '.join(FORMATS)}")
    cv.add_argument("--out", required=True, help="output CSV (written atomically)")
    cv.add_argument("--seed", type=int, default=0, help="seed of the UltraFeedback A/B coin (default 0)")
    cv.add_argument("--limit", type=int, default=None, help="read only the first N records (a quick look)")
    cv.add_argument("--strict", action="store_true",
                    help="fail (exit 1, write nothing) if any row cannot be converted; default: skip and count them")
    cv.set_defaults(func=_convert)

    o = sub.add_parser("oof", help="join k fold runs' validation predictions into one out-of-fold file",
                       description="Every row of the runs' training file (config.yaml data.train_csv) predicted once, "
                                   "by the run that held its fold out, as arena-predict would serve it (A/B-swap "
                                   "average at the export's temperature). Refuses overlapping folds, rows no run "
                                   "predicted, and runs of different splits. Rows in training-file order.")
    o.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="arena-train output dirs (config.yaml, val_predictions.npz, final/arena.json)")
    o.add_argument("--out", required=True, help="out-of-fold predictions to write (id,winner_model_a,...)")
    o.add_argument("--train", help="the training file (default: data.train_csv of the runs; give it when the runs "
                                   "were trained on another machine)")
    o.set_defaults(func=_oof, _parser=o)

    m = sub.add_parser("merge", help="join arena-predict --shard outputs, refusing overlaps and gaps",
                       description="Joins shard files written by arena-predict --shard K/N. Every shard's sidecar "
                                   "(SHARD.shard.json) must name the same scored file and N, and shards 0..N-1 must "
                                   "all be there; with --test every id of that file must be present once (then "
                                   "shards without sidecars are accepted) and rows follow its order.")
    m.add_argument("shards", nargs="+", metavar="SHARD", help="submission-format shard files")
    m.add_argument("--out", required=True, help="joined file to write")
    m.add_argument("--test", help="the scored CSV: check every id is present, write in its order")
    m.set_defaults(func=_merge, _parser=m)

    q = sub.add_parser("pseudo-label", help="soft-labelled training file from a model's predictions on extra data",
                       description="Writes --data's rows (texts byte for byte) with the predicted probabilities as "
                                   "soft labels in the winner columns; drops rows below --min-confidence and rows "
                                   "whose prompt and responses (normalised, either A/B order) occur in an --exclude "
                                   "file. Prints how many rows were dropped for each reason.")
    q.add_argument("--data", required=True, help="unlabelled battles (test.csv format)")
    q.add_argument("--predictions", required=True, help="arena-predict output for --data (id,winner_model_a,...)")
    q.add_argument("--out", required=True, help="training file to write (train.csv format, soft labels)")
    q.add_argument("--min-confidence", type=float, default=0.0, metavar="P",
                   help="drop rows whose highest probability is below P (default 0: keep all)")
    q.add_argument("--exclude", action="append", default=[], metavar="CSV",
                   help="drop battles also in this file (repeatable; e.g. train.csv and the validation file)")
    q.set_defaults(func=_pseudo_label, _parser=q)

    b = sub.add_parser("blend", help="fit ensemble weights on labelled predictions (JSON last), or apply weights",
                       description="Fit: non-negative weights summing to 1 minimising the log loss of the weighted "
                                   "mean of the prediction files on the --labels ids (use out-of-fold predictions); "
                                   "prints ONE JSON object last, weights in --predictions order: paste them into "
                                   "arena-predict --weights or the Kaggle kernel's WEIGHTS with the models in the "
                                   "same order. --fit-temperature also fits one temperature T on the blend "
                                   "(p^(1/T) renormalised; arena-predict does not apply it). Apply: --weights and "
                                   "--out write the blend of files holding the same ids.")
    b.add_argument("--predictions", required=True, nargs="+", metavar="CSV", help="submission-format files")
    b.add_argument("--labels", help="labelled CSV (train.csv format) whose ids every prediction file must cover")
    b.add_argument("--weights", metavar="W1,W2,...", help="apply these weights (normalised) instead of fitting")
    b.add_argument("--out", help="with --weights: write the blend (ids in the first file's order)")
    b.add_argument("--fit-temperature", action="store_true", help="also fit one temperature on the blend")
    b.add_argument("--temperature", type=float, metavar="T", help="apply this temperature to the blend")
    b.set_defaults(func=_blend, _parser=b)
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
