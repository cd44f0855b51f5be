#!/usr/bin/env bash
# Train on several nodes with DeepSpeed's launcher and a hostfile (run it on the first node).
#
#   launch/train_multinode.sh CONFIG HOSTFILE [key.sub=value ...]
#
#   cat hostfile            # DeepSpeed hostfile: one "hostname slots=GPUS" line per node, '#' comments allowed
#   gpu-node-1 slots=8
#   gpu-node-2 slots=8
#   NCCL_SOCKET_IFNAME=ib0 launch/train_multinode.sh configs/gemma2/9b_full.yaml hostfile model.name_or_path=/models/g2
#   DRY_RUN=1 launch/train_multinode.sh configs/gemma2/9b_full.yaml hostfile   # print the command, run nothing
#
# Requirements: passwordless ssh from this node to every host (DeepSpeed's default launcher is pdsh; LAUNCHER=openmpi
# uses mpirun), the same repository path, Python environment, model and data paths on every node (shared filesystem).
# Plan memory for the whole job first: python -m training --config CONFIG --plan --gpus 8 --nodes 2
#
# Rendezvous:
#   MASTER_ADDR   address of the rank-0 node that the others can reach (default: the first host in HOSTFILE)
#   MASTER_PORT   a free TCP port on it (default 29500)
#
# NCCL. DeepSpeed forwards every NCCL_*, PYTHON*, UCX_* and MLFLOW* variable of this shell to all nodes, so set them
# here; this script forwards FORWARD_VARS (below) too, through a DeepSpeed environment file (DS_ENV_FILE).
#   NCCL_SOCKET_IFNAME=ib0|eth0  interface for NCCL's bootstrap and socket traffic; the one that routes between nodes
#                                (`ip -br addr`). "^lo,docker0" excludes instead. GLOO_SOCKET_IFNAME likewise for gloo.
#   NCCL_IB_DISABLE=0|1          1 forces TCP sockets (slow; useful to tell an InfiniBand problem from anything else)
#   NCCL_IB_HCA=mlx5_0,mlx5_1    which InfiniBand/RoCE adapters to use (`ibv_devices`); default: all
#   NCCL_IB_GID_INDEX=3          RoCE v2 on most Ethernet fabrics (InfiniBand needs nothing)
#   NCCL_NET_GDR_LEVEL=PHB       how far GPUDirect RDMA may reach across PCIe (default chosen by NCCL topology detection)
#   NCCL_DEBUG=WARN|INFO         INFO prints the rings/trees and the transport picked: look for "NET/IB" vs "NET/Socket"
#   NCCL_DEBUG_SUBSYS=INIT,NET   restrict INFO output
#   NCCL_P2P_DISABLE / NCCL_SHM_DISABLE=1   debugging only (intra-node transport problems)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1       a rank whose peer died fails instead of hanging until the timeout
#   (forwarded via FORWARD_VARS, like OMP_NUM_THREADS, HF_HOME, WANDB_*, ARENA_*)
#
# Environment: LAUNCHER (pdsh, openmpi, mvapich, slurm: DeepSpeed --launcher), DEEPSPEED (launcher command), DRY_RUN=1.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/train_multinode.sh CONFIG HOSTFILE [key.sub=value ...]
  CONFIG    run config YAML (e.g. configs/gemma2/9b_full.yaml)
  HOSTFILE  DeepSpeed hostfile: one "hostname slots=GPUS" line per node
  key=value run-config overrides, e.g. data.micro_batch_size=1
  env: DRY_RUN=1 prints the command; MASTER_ADDR (first host), MASTER_PORT (29500), LAUNCHER (pdsh),
       NCCL_* (see the comments at the top of this script)
EOF
  exit 2
}

die() { echo "launch/train_multinode.sh: $*" >&2; exit 2; }

# Variables DeepSpeed does not forward by itself (it forwards NCCL_*, PYTHON*, UCX_*, MLFLOW*).
FORWARD_VARS=(TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_BLOCKING_WAIT GLOO_SOCKET_IFNAME OMP_NUM_THREADS
              CUDA_DEVICE_MAX_CONNECTIONS HF_HOME HF_HUB_OFFLINE TRANSFORMERS_OFFLINE WANDB_MODE WANDB_API_KEY
              WANDB_PROJECT WANDB_ENTITY ARENA_CACHE ARENA_SHARED)

[[ $# -ge 2 ]] || usage
config=$1
hostfile=$2
shift 2
[[ -f $config ]] || die "config file not found: $config"
[[ -f $hostfile ]] || die "hostfile not found: $hostfile"
for arg in "$@"; do
  [[ $arg == *=* ]] || die "extra arguments are overrides of the form key.sub=value, got '$arg'"
done

# Validate the hostfile the way DeepSpeed parses it, so a typo fails here and not after ssh to every node.
hosts=()
while read -r line || [[ -n $line ]]; do
  line=${line%%#*}
  [[ -z ${line//[[:space:]]/} ]] && continue
  [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]] ||
    die "$hostfile: bad line '$line' (expected 'hostname slots=N')"
  for h in "${hosts[@]}"; do
    [[ $h != "${BASH_REMATCH[1]}" ]] || die "$hostfile: host ${BASH_REMATCH[1]} is listed twice"
  done
  hosts+=("${BASH_REMATCH[1]}")
done <"$hostfile"
((${#hosts[@]} >= 1)) || die "$hostfile lists no hosts"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # PYTHON* variables reach every node
master_addr=${MASTER_ADDR:-${hosts[0]}}
master_port=${MASTER_PORT:-29500}

read -r -a launcher <<<"${DEEPSPEED:-deepspeed}"
cmd=("${launcher[@]}" --hostfile "$hostfile" --launcher "${LAUNCHER:-pdsh}" --master_addr "$master_addr"
     --master_port "$master_port" --module training --config "$config" "$@")

# DeepSpeed reads KEY=VALUE lines from $DS_ENV_FILE (absolute path) and exports them on every node.
env_lines=()
for var in "${FORWARD_VARS[@]}"; do
  if [[ -n ${!var:-} && ${!var} != *$'\n'* ]]; then
    env_lines+=("$var=${!var}")
  fi
done

if [[ ${DRY_RUN:-0} == 1 ]]; then
  forwarded="${env_lines[*]%%=*}"
  echo "# ${#hosts[@]} nodes: ${hosts[*]}; also forwarded to every node: ${forwarded:-(none)}"
  printf '%q' "${cmd[0]}"
  printf ' %q' "${cmd[@]:1}"
  echo
  exit 0
fi

if ((${#env_lines[@]})); then
  # Setting DS_ENV_FILE hides the user's own ~/.deepspeed_env and ./.deepspeed_env: copy them in first (without blank
  # lines, which DeepSpeed's parser rejects).
  env_file=$(mktemp "${TMPDIR:-/tmp}/arena-deepspeed-env.XXXXXX")
  trap 'rm -f "$env_file"' EXIT
  for f in "$HOME/.deepspeed_env" ./.deepspeed_env ${DS_ENV_FILE:+"$DS_ENV_FILE"}; do
    [[ -f $f ]] && grep -v '^[[:space:]]*$' "$f" >>"$env_file" || true
  done
  printf '%s\n' "${env_lines[@]}" >>"$env_file"
  export DS_ENV_FILE=$env_file
fi
"${cmd[@]}"
