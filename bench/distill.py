"""Do soft targets help? Distillation of out-of-fold teacher probabilities, and pseudo-labelled extra rows (CPU).

Run from the repository root (nothing downloaded; 12 minutes on 2 shared CPU cores with the defaults):

    python bench/distill.py [--seeds 0,1,2] [--jobs 3] [--label-noise 0.35] [--rows 500] [--extra-rows 1500]
                            [--folds 4] [--alpha 0.8] [--min-confidence 0.5] [--workdir DIR]

The regime is the one where the field reports gains: few labelled rows (500) with heavy label noise (35% redrawn at
random), a teacher ensemble stronger than the student (4 folds of a 2x64 model vs a 1x32 student), and three times as
many unlabelled rows as labelled ones. Every seed has its own data, teachers and students (the pairs share them);
seeds run in parallel (--jobs, each command on one thread). Per seed, the pipeline a user runs, one subprocess per
command:
  data      `arena-data sample`: a noisy training file (--label-noise of the labels redrawn at random), its extra
            unlabelled rows (test.csv), and a CLEAN labelled validation file (another seed, no noise)
  teachers  K fold runs (`data.valid_fold=k`); the first one also trains the BPE tokenizer every other run reuses
  oof       `arena-data oof teachers/fold*`: every training row's out-of-fold probabilities
  students  the same student, same seed and steps, trained on the noisy file with hard labels (`hard`) and with
            `data.soft_labels=oof.csv train.distill.alpha=0.8` (`distilled`)
  pseudo    the teacher ensemble (`arena-predict --model fold0 ...`, one view: A/B-swap TTA would double the CPU cost)
            labels the extra rows, `arena-data pseudo-label --min-confidence 0.5` keeps the confident ones as
            soft-labelled rows, the student trains on train + them for 2 epochs (`pseudo`). Baseline `train_only`: the
            student on train alone (hard labels), the BETTER of two runs, as many optimizer steps as the pseudo run
            (`train_only_same_steps`) and as many epochs as `hard` (`train_only_same_epochs`, fewer steps), so
            pseudo wins only if it beats both. The same call scores the clean file (`teachers_clean`, one view).
Every student (initializer_range 0.1: at 0.02 some seeds' students never left the ln 3 plateau) is scored the same
way: the export's log loss on the clean validation file, A/B-swap average as served, no temperature scaling (so
calibration gains from soft targets are not fitted away). The last line is one JSON object: the means `distilled`,
`hard`, `pseudo`, `train_only`, win counts, per-seed values.

Measured (defaults, seeds 0 / 1 / 2, 719 s on 2 cores shared with other jobs), clean-validation log loss:
  distilled 0.446 / 0.390 / 0.389 (mean 0.408) vs hard 0.612 / 0.404 / 0.447 (mean 0.488): 3 of 3 wins
  pseudo    0.515 / 0.330 / 0.367 (mean 0.404) vs train_only 0.612 / 0.404 / 0.447 (mean 0.488): 3 of 3 wins;
            train_only is the same-epochs run every time: the same-steps one (224-242 steps vs 186) is worse,
            0.715 / 0.428 / 0.698 (more passes over 500 noisy rows fit the noise)
  teachers_clean (4-fold ensemble, one view) 0.456 / 0.326 / 0.400: the students approach it, none beats it.
Held-out seeds 3 / 4 / 5 (never used while choosing settings; 891 s on busier cores): distilled 0.420 / 0.326 /
0.359 (mean 0.368) vs hard 0.646 / 0.378 / 0.445 (mean 0.490), 3 of 3; pseudo 0.459 / 0.338 / 0.415 (mean 0.404) vs
train_only 0.632 / 0.378 / 0.441 (mean 0.484; same steps won on seeds 3 and 5), 3 of 3, but by only 0.026 on seed 5
and 0.040 on seed 4 against gains of 0.1-0.2 on the worst seeds: pseudo's gain is smaller and less even than
distillation's. teachers_clean 0.439 / 0.346 / 0.361.
Seeds 0 and 1 were also the development seeds (the --min-confidence 0.5 choice came from one probe on seed 0: all
1500 rows, TTA teacher labels, gave 0.688 vs 0.612 / 0.571). Not effects here: with the old regime (1000 rows, 20%
noise, alpha 0.5) and initializer_range 0.1, distillation lost to hard labels on two probed seeds (0.234 vs 0.205,
0.405 vs 0.231): with plenty of mildly noisy rows the hard-label student is already close to the teachers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = "configs/tiny/llama_cpu.yaml"


def model_overrides(size: str, init_range: float) -> list[str]:
    layers, hidden = map(int, size.split("x"))
    return [f"model.tiny.num_hidden_layers={layers}", f"model.tiny.hidden_size={hidden}",
            f"model.tiny.intermediate_size={2 * hidden}", f"model.tiny.initializer_range={init_range}"]


def run(cmd: list[str], log: Path, threads: int) -> None:
    """One pipeline command; its output goes to `log`, a failure stops the bench showing the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    print(f"  {time.time() - t0:6.1f}s  {log.parent.parent.name}/{log.name}", file=sys.stderr, flush=True)
    if r.returncode != 0:
        raise RuntimeError(f"command failed (exit {r.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")


def train(out: Path, overrides: list[str], logs: Path, threads: int) -> tuple[float, int]:
    """Train one run; returns the exported model's validation log loss and its optimizer steps."""
    run([sys.executable, "-m", "training", "--config", PRESET, f"output_dir={out}", "resume=never", *overrides],
        logs / f"{out.parent.name}_{out.name}.log", threads)
    val = float(json.loads((out / "final" / "arena.json").read_text())["val_logloss"])
    return val, int(json.loads((out / "run_info.json").read_text())["total_steps"])


def one_seed(args: argparse.Namespace, seed: int, work: Path, threads: int) -> dict:
    """The whole pipeline for one seed (its own data, teachers and students); returns its log losses."""
    py = sys.executable
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    # ---- data: noisy train + unlabelled extra rows, and a CLEAN validation file (another seed, no noise)
    run([py, "-m", "data", "sample", "--out", str(work / "data"), "--rows", str(args.rows), "--test-rows",
         str(args.extra_rows), "--seed", str(seed), "--label-noise", str(args.label_noise)], logs / "sample.log", threads)
    run([py, "-m", "data", "sample", "--out", str(work / "clean"), "--rows", str(args.valid_rows), "--test-rows", "3",
         "--seed", str(seed + 10_000), "--label-noise", "0"], logs / "sample_clean.log", threads)
    train_csv, extra_csv, valid_csv = work / "data" / "train.csv", work / "data" / "test.csv", work / "clean" / "train.csv"
    common = ["train.max_steps=null", "train.eval_every=0", "train.save_every=0",
              f"train.warmup_ratio={args.warmup_ratio}", "train.warmup_steps=0",
              "train.temperature_scaling=false", f"train.seed={seed}",
              f"data.format.max_length={args.max_length}", "deepspeed.config=configs/deepspeed/zero2.json",
              "deepspeed.param_persistence_threshold=null", "model.gradient_checkpointing=false",
              f"data.cache_dir={work / 'cache'}", f"data.micro_batch_size={args.micro_batch}"]

    # ---- teachers: K fold runs; fold 0 trains the tokenizer the others reuse
    teacher_dirs, teacher_val = [], []
    tok = work / "teachers" / "fold0" / "tokenizer"
    for k in range(args.folds):
        out = work / "teachers" / f"fold{k}"
        teacher_dirs.append(out)
        teacher_val.append(train(out, [*common, *model_overrides(args.teacher, args.init_range),
                                       f"data.train_csv={train_csv}", f"data.num_folds={args.folds}",
                                       f"data.valid_fold={k}", f"train.epochs={args.teacher_epochs}",
                                       f"train.lr={args.teacher_lr}", "train.export=last",
                                       *([] if k == 0 else [f"data.tokenizer={tok}"])], logs, threads)[0])
    oof = work / "oof.csv"
    run([py, "-m", "data", "oof", *map(str, teacher_dirs), "--out", str(oof)], logs / "oof.log", threads)

    # ---- students: hard labels vs distilled (same data, seed, steps), both scored on the clean validation file
    student = [*common, *model_overrides(args.student, args.init_range), f"data.tokenizer={tok}",
               f"data.valid_csv={valid_csv}", f"train.lr={args.student_lr}", "train.export=last"]
    hard, hard_steps = train(work / "students" / "hard", [*student, f"data.train_csv={train_csv}",
                                                          f"train.epochs={args.student_epochs}"], logs, threads)
    distill = [f"data.soft_labels={oof}", f"train.distill.alpha={args.alpha}",
               f"train.distill.temperature={args.temperature}", f"train.distill.cosine={str(args.cosine).lower()}"]
    distilled, _ = train(work / "students" / "distilled", [*student, f"data.train_csv={train_csv}",
                                                           f"train.epochs={args.student_epochs}", *distill],
                         logs, threads)

    # ---- pseudo-labels: the teacher fold ensemble labels the extra rows (one view, no A/B swap: the CPU cost), and
    # the clean validation rows in the same call, to report how good the teachers are; the confident extra rows become
    # soft-labelled training rows and the student trains on train + them
    import numpy as np
    import pandas as pd

    from data.reading import LABEL_COLUMNS
    from data.scoring import log_loss, read_probabilities

    extra, clean = pd.read_csv(extra_csv), pd.read_csv(valid_csv)
    to_score = work / "teacher_inputs.csv"
    pd.concat([extra, clean[list(extra.columns)]], ignore_index=True).to_csv(to_score, index=False)
    probs = work / "teacher_probs.csv"
    run([py, "-m", "inference", *[a for d in teacher_dirs for a in ("--model", str(d / "final"))], "--test",
         str(to_score), "--out", str(probs), "--devices", "cpu", "--time-budget", "none", "--no-tta",
         "--batch-tokens", "32768"], logs / "predict.log", threads)
    ids, p = read_probabilities(probs)
    by_id = pd.DataFrame(p, index=ids, columns=list(LABEL_COLUMNS))
    clean_y = np.argmax(clean[list(LABEL_COLUMNS)].to_numpy(), axis=1)
    teachers_clean = log_loss(by_id.loc[clean["id"]].to_numpy(), clean_y)
    extra_probs = work / "extra_probs.csv"
    by_id.loc[extra["id"]].rename_axis("id").reset_index().to_csv(extra_probs, index=False)
    labelled = work / "extra_labelled.csv"
    run([py, "-m", "data", "pseudo-label", "--data", str(extra_csv), "--predictions", str(extra_probs), "--out",
         str(labelled), "--min-confidence", str(args.min_confidence)], logs / "pseudo_label.log", threads)
    pseudo_rows = len(pd.read_csv(labelled))
    combined = work / "train_plus_pseudo.csv"
    pd.concat([pd.read_csv(train_csv), pd.read_csv(labelled)], ignore_index=True).to_csv(combined, index=False)
    pseudo, steps = train(work / "students" / "pseudo", [*student, f"data.train_csv={combined}",
                                                         f"train.epochs={args.pseudo_epochs}"], logs, threads)
    # more rows also mean more optimizer steps: the same student on train alone for as many steps
    same_steps, _ = train(work / "students" / "train_only_same_steps",
                          [*student, f"data.train_csv={train_csv}", f"train.max_steps={steps}"],
                          logs, threads)
    return {"seed": seed, "distilled": distilled, "hard": hard, "pseudo": pseudo,
            "train_only_same_steps": same_steps, "train_only_same_epochs": hard,
            "train_only": min(same_steps, hard), "student_steps": hard_steps, "pseudo_steps": steps,
            "teacher_fold_val_logloss": teacher_val, "teachers_clean": teachers_clean, "pseudo_rows": pseudo_rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: each has its own data, teachers, students")
    p.add_argument("--jobs", type=int, default=3,
                   help="seeds run at once (each command then on 1 thread; 3 on 2 cores keeps both busy)")
    p.add_argument("--rows", type=int, default=500, help="noisy training rows")
    p.add_argument("--extra-rows", type=int, default=1500, help="unlabelled extra rows for pseudo-labelling")
    p.add_argument("--valid-rows", type=int, default=400, help="clean validation rows")
    p.add_argument("--label-noise", type=float, default=0.35, help="share of training labels redrawn at random")
    p.add_argument("--folds", type=int, default=4, help="teacher folds")
    p.add_argument("--teacher", default="2x64", help="teacher size LAYERSxHIDDEN")
    p.add_argument("--student", default="1x32", help="student size LAYERSxHIDDEN")
    p.add_argument("--init-range", type=float, default=0.1,
                   help="model.tiny.initializer_range of every run (0.02 leaves some seeds on the ln 3 plateau)")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--student-epochs", type=int, default=6)
    p.add_argument("--pseudo-epochs", type=int, default=2, help="epochs of the train + pseudo-labelled student")
    p.add_argument("--min-confidence", type=float, default=0.5,
                   help="pseudo-label --min-confidence: extra rows whose top teacher probability is lower are dropped")
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--student-lr", type=float, default=1e-2)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--micro-batch", type=int, default=16, help="data.micro_batch_size of every run")
    p.add_argument("--alpha", type=float, default=0.8, help="train.distill.alpha of the distilled student")
    p.add_argument("--temperature", type=float, default=1.0, help="train.distill.temperature")
    p.add_argument("--cosine", action="store_true", help="train.distill.cosine")
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--workdir", help="keep everything here (default: a temporary directory)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.time()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="distill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench/distill.py: working in {work}", file=sys.stderr)
    jobs = max(1, min(args.jobs, len(seeds)))
    threads = 1 if jobs > 1 else int(os.environ.get("OMP_NUM_THREADS", "2"))
    try:
        with ThreadPoolExecutor(jobs) as pool:
            per_seed = list(pool.map(lambda s: one_seed(args, s, work / f"seed{s}", threads), seeds))
    except RuntimeError as e:
        sys.exit(str(e))

    def summary(key: str) -> float:
        return round(statistics.mean(r[key] for r in per_seed), 5)

    def values(key: str) -> list[float]:
        return [round(r[key], 5) for r in per_seed]

    result = {
        "bench": "distill", **{k: summary(k) for k in ("distilled", "hard", "pseudo", "train_only")},
        "distill_wins": sum(r["distilled"] < r["hard"] for r in per_seed),
        "pseudo_wins": sum(r["pseudo"] < r["train_only"] for r in per_seed), "seeds": seeds,
        "per_seed": {k: values(k) for k in ("distilled", "hard", "pseudo", "train_only", "train_only_same_steps",
                                            "train_only_same_epochs")},
        "train_only_same_steps": summary("train_only_same_steps"),
        "train_only_same_epochs": summary("train_only_same_epochs"),
        "steps": {"student": [r["student_steps"] for r in per_seed], "pseudo": [r["pseudo_steps"] for r in per_seed]},
        "teachers_clean": summary("teachers_clean"), "per_seed_teachers_clean": values("teachers_clean"),
        "pseudo_rows": [r["pseudo_rows"] for r in per_seed],
        "teacher_fold_val_logloss": [[round(v, 5) for v in r["teacher_fold_val_logloss"]] for r in per_seed],
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "seeds")},
        "seconds": round(time.time() - t_start, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
