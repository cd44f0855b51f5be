#!/usr/bin/env bash
# Quickstart on a fresh CPU-only machine (~10 minutes on 2 cores, nothing downloaded but pip packages):
#   1. a venv with the CPU install (torch CPU wheel first),
#   2. synthetic Kaggle-format data (arena-data sample): a train file and a separate labelled validation file,
#   3. the tiny Llama preset trained with 2-process DeepSpeed ZeRO-3 on the CPU (gloo),
#   4. arena-predict with 2 CPU workers on the validation file,
#   5. arena-data score: the validation log loss next to the uniform 1.0986 and the class prior.
#
#   bash launch/quickstart.sh                 # everything
#   SKIP_INSTALL=1 bash launch/quickstart.sh  # reuse the active environment
#   RUN=runs/qs ROWS=3000 STEPS=150 bash launch/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/quickstart}
ROWS=${ROWS:-3000}
STEPS=${STEPS:-150}
PRESET=${PRESET:-configs/tiny/llama_cpu.yaml}
VENV=${VENV:-.venv}

if [ -z "${SKIP_INSTALL:-}" ]; then
  echo "== install: $VENV (CPU)"
  python3 -m venv "$VENV"
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  python -m pip install -q --upgrade pip
  pip install -q torch==2.13.0   # the CPU wheel; an unpinned torch would pull a multi-GB CUDA build
  pip install -q -c constraints.txt -e ".[train]"   # the locked versions CI tests (launch/lock.sh refreshes)
fi

# Two processes share two cores: one OpenMP thread each is ~30% faster than oversubscribing.
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

echo "== data: $RUN/data (train) and $RUN/valid (labelled validation, other seed)"
arena-data sample --out "$RUN/data" --rows "$ROWS" --seed 0
arena-data sample --out "$RUN/valid" --rows 600 --seed 1
arena-data stats "$RUN/data/train.csv"

echo "== train: $PRESET, 2 CPU processes, ZeRO-3"
deepspeed --num_gpus 2 --module training --config "$PRESET" \
  output_dir="$RUN/model" data.train_csv="$RUN/data/train.csv" data.valid_csv="$RUN/valid/train.csv" \
  train.max_steps="$STEPS" train.eval_every=50 train.save_every=50

echo "== predict: 2 CPU workers, A/B-swap TTA"
arena-predict --model "$RUN/model/final" --test "$RUN/valid/train.csv" --out "$RUN/submission.csv" --devices cpu:2

echo "== score (validation)"
arena-data score --submission "$RUN/submission.csv" --labels "$RUN/valid/train.csv"
arena-data stats "$RUN/valid/train.csv" | grep "prior log loss"
echo "report: $RUN/model/report/report.md"
