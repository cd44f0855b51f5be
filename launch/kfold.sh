#!/usr/bin/env bash
# K-fold cross-validation: train the K prompt-grouped folds of a run config one after another, fold k with
# data.num_folds=K data.valid_fold=k output_dir=BASE/fold{k}, then print the command that joins their out-of-fold
# predictions (each fold's BASE/fold{k}/val_predictions.npz) into one file.
#
#   launch/kfold.sh CONFIG K [key.sub=value ...]
#
#   launch/kfold.sh configs/gemma2/9b_full.yaml 5 model.name_or_path=/models/gemma-2-9b    # this node, launch/train.sh
#   NUM_GPUS=4 launch/kfold.sh configs/llama3/8b_full.yaml 5 output_dir=runs/l3_cv          # BASE=runs/l3_cv
#   RUNNER=multinode HOSTFILE=hostfile launch/kfold.sh configs/gemma2/9b_full.yaml 5        # launch/train_multinode.sh
#   RUNNER=python launch/kfold.sh configs/tiny/llama_cpu.yaml 2 train.max_steps=3           # one plain process a fold
#   DRY_RUN=1 launch/kfold.sh configs/gemma2/9b_full.yaml 5                                 # print, run nothing
#
# SLURM: one array task per fold, the folds then train in parallel, each in its own allocation:
#   sbatch --array=0-4 --nodes=1 --gpus-per-node=8 --cpus-per-task=32 --time=24:00:00 \
#     --wrap 'FOLD=$SLURM_ARRAY_TASK_ID RUNNER=slurm launch/kfold.sh configs/gemma2/9b_full.yaml 5'
# (submit from the repository root; RUNNER=slurm runs launch/slurm.sbatch inside the task's allocation.)
#
# BASE: the output_dir=... override, else the config's output_dir. A fold whose BASE/fold{k}/final/arena.json exists
# is skipped, so the same command resumes a k-fold job: finished folds stay, an interrupted fold continues from its
# last checkpoint (resume=auto). The folds come from data/folds.py (prompt-grouped, data.fold_seed), so every battle
# is validated exactly once. data.valid_fold / data.num_folds / data.valid_csv are set here and refused as overrides.
#
# Environment:
#   RUNNER    train (default: launch/train.sh, NUM_GPUS processes on this node) | multinode (launch/train_multinode.sh
#             with HOSTFILE) | slurm (launch/slurm.sbatch, inside an allocation) | python (python -m training)
#   FOLD      train fold FOLD only (e.g. $SLURM_ARRAY_TASK_ID)
#   NUM_GPUS  processes per fold for RUNNER=train (default: train.sh's, all visible GPUs)
#   HOSTFILE  DeepSpeed hostfile for RUNNER=multinode
#   PYTHON    interpreter for RUNNER=python and for reading CONFIG (default: python, else python3)
#   DRY_RUN=1 print each fold's command (the launchers' own dry runs), run nothing
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/kfold.sh CONFIG K [key.sub=value ...]
  CONFIG    run config YAML (e.g. configs/gemma2/9b_full.yaml); its output_dir (or an output_dir= override) is BASE
  K         number of folds (>= 2): fold k trains with data.valid_fold=k into BASE/fold{k}
  key=value run-config overrides for every fold, e.g. train.max_steps=300
  env: RUNNER=train|multinode|slurm|python (train), FOLD=k (one fold only), NUM_GPUS, HOSTFILE, PYTHON,
       DRY_RUN=1 prints the commands. Folds with BASE/fold{k}/final/arena.json are skipped.
  at the end: the `arena-data oof BASE/fold0 ... --out BASE/oof.csv` command that joins the folds' predictions
EOF
  exit 2
}

die() { echo "launch/kfold.sh: $*" >&2; exit 2; }

[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage
[[ $# -ge 2 ]] || usage
config=$1
folds=$2
shift 2
[[ -f $config ]] || die "config file not found: $config"
[[ $folds =~ ^[0-9]+$ ]] && ((10#$folds >= 2)) || die "K must be an integer >= 2, got '$folds'"

base=""
cleared_valid_csv=0
overrides=()  # the arguments, less output_dir= (each fold gets its own)
for arg in "$@"; do
  [[ $arg == *=* ]] || die "extra arguments are overrides of the form key.sub=value, got '$arg'"
  case ${arg%%=*} in
    data.valid_fold | data.num_folds) die "'$arg': the fold settings are set per fold by this script" ;;
    data.valid_csv)
      [[ -z ${arg#*=} || ${arg#*=} == null ]] ||
        die "'$arg': k-fold validates on held-out folds of data.train_csv, not on a separate file"
      cleared_valid_csv=1 ;;
    output_dir) base=${arg#*=}; continue ;;
  esac
  overrides+=("$arg")
done

python=${PYTHON:-$(command -v python || command -v python3 || echo python)}
# the config's output_dir, and a refusal of a fixed validation file; YAML is read by Python, not by hand
config_base=$("$python" - "$config" "$cleared_valid_csv" <<'PY'
import sys
import yaml

try:
    raw = yaml.safe_load(open(sys.argv[1])) or {}
except yaml.YAMLError as e:
    sys.exit(print(f"launch/kfold.sh: {sys.argv[1]}: not valid YAML ({getattr(e, 'problem', e)})", file=sys.stderr) or 2)
if not isinstance(raw, dict):
    sys.exit(print(f"launch/kfold.sh: {sys.argv[1]}: the top level must be a mapping", file=sys.stderr) or 2)
if (raw.get("data") or {}).get("valid_csv") and sys.argv[2] != "1":
    print(f"launch/kfold.sh: {sys.argv[1]} sets data.valid_csv: k-fold validates on held-out folds of "
          "data.train_csv; override it with data.valid_csv=null", file=sys.stderr)
    sys.exit(2)
print(raw.get("output_dir") or "")
PY
) || exit 2
base=${base:-$config_base}
[[ -n $base ]] || die "$config has no output_dir: give output_dir=BASE"
base=${base%/}

if [[ -n ${FOLD:-} ]]; then
  [[ $FOLD =~ ^[0-9]+$ ]] && ((10#$FOLD < folds)) || die "FOLD must be in 0..$((folds - 1)), got '$FOLD'"
  selected=("$((10#$FOLD))")
else
  selected=()
  for ((k = 0; k < folds; k++)); do selected+=("$k"); done
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runner=${RUNNER:-train}
case $runner in
  train) launcher=(bash "$root/launch/train.sh" "$config" ${NUM_GPUS:+"$NUM_GPUS"}) ;;
  multinode)
    [[ -n ${HOSTFILE:-} ]] || die "RUNNER=multinode needs HOSTFILE (a DeepSpeed hostfile)"
    launcher=(bash "$root/launch/train_multinode.sh" "$config" "$HOSTFILE") ;;
  slurm) launcher=(bash "$root/launch/slurm.sbatch" "$config") ;;
  python)
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    launcher=("$python" -m training --config "$config") ;;
  *) die "RUNNER must be train, multinode, slurm or python, got '$runner'" ;;
esac

print_cmd() {
  printf '%q' "$1"
  shift
  (($#)) && printf ' %q' "$@"
  echo
}

done_folds=0
for k in "${selected[@]}"; do
  out="$base/fold$k"
  if [[ -f $out/final/arena.json ]]; then
    echo "# fold $k/$folds: done ($out/final/arena.json exists), skipped"
    continue
  fi
  cmd=("${launcher[@]}" ${overrides[@]+"${overrides[@]}"} "data.num_folds=$folds" "data.valid_fold=$k" "output_dir=$out")
  echo "# fold $k/$folds: $out"
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    if [[ $runner == python ]]; then
      print_cmd "${cmd[@]}"
    else
      "${cmd[@]}"  # the launcher's own dry run prints its exact command
    fi
    continue
  fi
  rc=0
  "${cmd[@]}" || rc=$?
  ((rc == 0)) || { echo "launch/kfold.sh: fold $k failed (exit status $rc); rerun the same command to resume it" >&2; exit "$rc"; }
  done_folds=$((done_folds + 1))
done

dirs=()
finished=0
for ((k = 0; k < folds; k++)); do
  dirs+=("$base/fold$k")
  [[ -f $base/fold$k/final/arena.json ]] && finished=$((finished + 1))
done
when=""
((finished == folds)) || when=" once all $folds are done"
echo "# $finished of $folds folds finished ($done_folds trained now); join their out-of-fold predictions$when:"
print_cmd arena-data oof "${dirs[@]}" --out "$base/oof.csv"
