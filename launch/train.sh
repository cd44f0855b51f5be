#!/usr/bin/env bash
# Train on one node with DeepSpeed, one process per GPU.
#
#   launch/train.sh CONFIG [NUM_GPUS] [key.sub=value ...]
#
#   launch/train.sh configs/gemma2/9b_full.yaml 8 model.name_or_path=/models/gemma-2-9b data.train_csv=/data/train.csv
#   OMP_NUM_THREADS=1 launch/train.sh configs/tiny/llama_cpu.yaml 2     # 2 CPU processes (gloo), no GPU needed
#   DRY_RUN=1 launch/train.sh configs/gemma2/9b_full.yaml 8             # print the command, run nothing
#
# NUM_GPUS: default all visible GPUs (CUDA_VISIBLE_DEVICES if set, else nvidia-smi), else 1. Extra arguments are run-
# config overrides (training/config.py). Check memory first: python -m training --config CONFIG --plan --gpus N
# (the run also refuses to start on GPUs when the plan does not fit).
#
# Environment: MASTER_PORT (default 29500; give concurrent jobs on one node different ports), DEEPSPEED (launcher
# command, default `deepspeed`), DRY_RUN=1.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/train.sh CONFIG [NUM_GPUS] [key.sub=value ...]
  CONFIG    run config YAML (e.g. configs/gemma2/9b_full.yaml)
  NUM_GPUS  processes on this node (default: all visible GPUs, else 1)
  key=value run-config overrides, e.g. data.micro_batch_size=1
  env: DRY_RUN=1 prints the command; MASTER_PORT (29500); DEEPSPEED (deepspeed)
EOF
  exit 2
}

die() { echo "launch/train.sh: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || usage
[[ $1 == -h || $1 == --help ]] && usage
config=$1
shift
[[ -f $config ]] || die "config file not found: $config"

num_gpus=""
if [[ $# -ge 1 && $1 =~ ^[0-9]+$ ]]; then
  num_gpus=$1
  shift
  ((num_gpus >= 1)) || die "NUM_GPUS must be >= 1, got $num_gpus"
fi
for arg in "$@"; do
  [[ $arg == *=* ]] || die "extra arguments are overrides of the form key.sub=value, got '$arg'"
done

# The repository root on PYTHONPATH lets `--module training` import from any working directory.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

# DeepSpeed ignores CUDA_VISIBLE_DEVICES as soon as --num_gpus is given, so visible devices become --include.
resources=()
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  if [[ -n $num_gpus ]]; then
    ((num_gpus <= ${#visible[@]})) || die "NUM_GPUS=$num_gpus but CUDA_VISIBLE_DEVICES lists ${#visible[@]} devices"
    visible=("${visible[@]:0:num_gpus}")
  fi
  resources=(--include "localhost:$(IFS=,; echo "${visible[*]}")")
else
  if [[ -z $num_gpus ]]; then
    num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ $num_gpus =~ ^[1-9][0-9]*$ ]] || num_gpus=1
  fi
  resources=(--num_gpus "$num_gpus")
fi

read -r -a launcher <<<"${DEEPSPEED:-deepspeed}"
cmd=("${launcher[@]}" "${resources[@]}" --master_port "${MASTER_PORT:-29500}"
     --module training --config "$config" "$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q' "${cmd[0]}"
  printf ' %q' "${cmd[@]:1}"
  echo
  exit 0
fi
exec "${cmd[@]}"
