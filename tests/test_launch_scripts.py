"""launch/*.sh and launch/slurm.sbatch: syntax, usage errors, the exact command of DRY_RUN=1, and that the real
(non-dry) path hands the launcher exactly those arguments. Launchers (deepspeed, torchrun, srun) are replaced by
stand-ins on PATH that record their argv and environment; one test launches a real 2-process CPU run."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN, MULTI, SLURM = ROOT / "launch/train.sh", ROOT / "launch/train_multinode.sh", ROOT / "launch/slurm.sbatch"
SCRIPTS = (TRAIN, MULTI, SLURM)
CONFIG = "configs/tiny/llama_cpu.yaml"

# Records argv, PYTHONPATH, SLURM_NODEID and the DeepSpeed env/host files as one JSON line per call.
RECORDER = f"""#!{sys.executable}
import json, os, sys
argv = sys.argv[1:]
files = {{}}
for flag in ("--hostfile",):
    if flag in argv:
        p = argv[argv.index(flag) + 1]
        files[flag] = open(p).read() if os.path.exists(p) else None
if os.environ.get("DS_ENV_FILE"):
    files["DS_ENV_FILE"] = open(os.environ["DS_ENV_FILE"]).read()
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "argv": argv, "files": files,
                        "pythonpath": os.environ.get("PYTHONPATH", ""), "node": os.environ.get("SLURM_NODEID"),
                        "ds_env_file": os.environ.get("DS_ENV_FILE")}}) + "\\n")
"""

# srun stand-in: drop srun's own options, run the command once per node with SLURM_NODEID set.
FAKE_SRUN = """#!/usr/bin/env bash
set -euo pipefail
nodes=1
while [[ $1 == --* ]]; do
  case $1 in
    --nodes) nodes=$2; shift 2 ;;
    --ntasks-per-node | --cpus-per-task) shift 2 ;;
    *) shift ;;
  esac
done
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i "$@"; done
"""


@pytest.fixture
def fakes(tmp_path):
    """PATH with recording deepspeed/torchrun and a per-node srun; returns (env, read_log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("deepspeed", RECORDER), ("torchrun", RECORDER), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "CUDA_VISIBLE", "MASTER_", "DRY_RUN", "DS_ENV", "LAUNCHER", "GPUS_PER"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log))

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


def run(script: Path, *args: str, env: dict | None = None, cwd: Path = ROOT, **extra_env: str):
    e = dict(env if env is not None else os.environ)
    e.update(extra_env)
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=60)


def dry(script: Path, *args: str, env: dict, **extra_env: str) -> list[str]:
    """The command DRY_RUN=1 prints (last line), split like the shell would."""
    r = run(script, *args, env=env, DRY_RUN="1", **extra_env)
    assert r.returncode == 0, r.stderr
    return shlex.split(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ all scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_syntax_and_strict_mode(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_usage_on_no_arguments(script):
    r = run(script)
    assert r.returncode == 2 and r.stderr.startswith("usage:") and "CONFIG" in r.stderr


@pytest.mark.parametrize("script,args", [
    (TRAIN, ("missing.yaml",)),
    (TRAIN, (CONFIG, "not-an-override")),
    (TRAIN, (CONFIG, "0")),
    (MULTI, (CONFIG,)),
    (MULTI, (CONFIG, "no-such-hostfile")),
    (SLURM, (CONFIG, "not-an-override")),
], ids=["no-config", "bad-override", "zero-gpus", "no-hostfile", "missing-hostfile", "slurm-bad-override"])
def test_wrong_arguments_fail_with_a_reason(script, args):
    r = run(script, *args, SLURM_JOB_NODELIST="n1")
    assert r.returncode == 2 and r.stderr.strip(), r.stderr


def test_multi_node_flags_are_documented():
    text = MULTI.read_text() + SLURM.read_text()
    for var in ("NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_IB_HCA", "NCCL_DEBUG", "MASTER_ADDR", "MASTER_PORT",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        assert var in MULTI.read_text() and var in text, var


# ------------------------------------------------------------------------------------------------ train.sh


def test_train_dry_run_prints_the_exact_command(fakes):
    env, calls = fakes
    cmd = dry(TRAIN, CONFIG, "2", "train.max_steps=3", "data.train_csv=/data/with space.csv", env=env,
              MASTER_PORT="29600")
    assert cmd == ["deepspeed", "--num_gpus", "2", "--master_port", "29600", "--module", "training",
                   "--config", CONFIG, "train.max_steps=3", "data.train_csv=/data/with space.csv"]
    assert calls() == []  # nothing ran
    # Without DRY_RUN the launcher receives exactly those arguments, with the repository on PYTHONPATH.
    r = run(TRAIN, CONFIG, "2", "train.max_steps=3", "data.train_csv=/data/with space.csv", env=env,
            MASTER_PORT="29600")
    assert r.returncode == 0, r.stderr
    (call,) = calls()
    assert ["deepspeed", *call["argv"]] == cmd
    assert call["pythonpath"].split(":")[0] == str(ROOT)


def test_train_respects_cuda_visible_devices(fakes):
    env, _ = fakes
    assert dry(TRAIN, CONFIG, env=env, CUDA_VISIBLE_DEVICES="2,3,5")[1:3] == ["--include", "localhost:2,3,5"]
    assert dry(TRAIN, CONFIG, "2", env=env, CUDA_VISIBLE_DEVICES="2,3,5")[1:3] == ["--include", "localhost:2,3"]
    assert run(TRAIN, CONFIG, "4", env=env, CUDA_VISIBLE_DEVICES="0,1").returncode == 2


# ------------------------------------------------------------------------------------------------ multinode


def write_hostfile(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,valid", [
    ("# cluster\nnode-a slots=8\n\nnode-b slots=8  # spare\n", True),
    ("node-a slots=4\n", True),
    ("node-a slot=8\n", False),
    ("node-a\n", False),
    ("# only comments\n\n", False),
    ("node-a slots=8\nnode-a slots=8\n", False),
])
def test_hostfile_validation_agrees_with_deepspeed(tmp_path, fakes, text, valid):
    from deepspeed.launcher.runner import _parse_hostfile

    try:
        _parse_hostfile(text.splitlines(keepends=True))
        deepspeed_accepts = True
    except ValueError:
        deepspeed_accepts = False
    assert deepspeed_accepts == valid
    env, _ = fakes
    r = run(MULTI, CONFIG, str(write_hostfile(tmp_path / "hostfile", text)), env=env, DRY_RUN="1")
    assert (r.returncode == 0) == valid, r.stderr


def test_multinode_dry_run_and_forwarded_environment(tmp_path, fakes):
    env, calls = fakes
    hostfile = write_hostfile(tmp_path / "hostfile", "gpu-1 slots=8\ngpu-2 slots=8\n")
    config = str(ROOT / CONFIG)
    args = (config, str(hostfile), "data.micro_batch_size=1")
    cmd = dry(MULTI, *args, env=env)
    assert cmd == ["deepspeed", "--hostfile", str(hostfile), "--launcher", "pdsh", "--master_addr", "gpu-1",
                   "--master_port", "29500", "--module", "training", "--config", config, "data.micro_batch_size=1"]
    assert dry(MULTI, *args, env=env, MASTER_ADDR="10.0.0.5", LAUNCHER="openmpi")[4:8] == [
        "openmpi", "--master_addr", "10.0.0.5", "--master_port"]
    # The real path: same argv; variables DeepSpeed does not forward itself go through DS_ENV_FILE, after the
    # user's own ./.deepspeed_env (which DS_ENV_FILE would otherwise hide); the temporary file is removed.
    (tmp_path / ".deepspeed_env").write_text("HF_TOKEN_PATH=/x\n\n")
    forwardable = ("TORCH_NCCL_", "GLOO_", "OMP_", "CUDA_DEVICE_", "HF_", "TRANSFORMERS_", "WANDB_", "ARENA_")
    env = {k: v for k, v in env.items() if not k.startswith(forwardable)}
    r = subprocess.run(["bash", str(MULTI), *args], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "3"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (call,) = calls()
    assert ["deepspeed", *call["argv"]] == cmd
    assert call["files"]["DS_ENV_FILE"].splitlines() == ["HF_TOKEN_PATH=/x", "OMP_NUM_THREADS=3"]
    assert not Path(call["ds_env_file"]).exists()  # removed when the launcher exits


# ------------------------------------------------------------------------------------------------ SLURM


def test_slurm_torchrun_command(fakes):
    env, calls = fakes
    slurm = dict(SLURM_JOB_NODELIST="gpu[01-02],big[7,9-10]", SLURM_GPUS_PER_NODE="a100:8", SLURM_JOB_ID="42",
                 SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_PER_TASK="32")
    r = run(SLURM, CONFIG, "train.max_steps=3", env=env, DRY_RUN="1", **slurm)
    assert r.returncode == 0, r.stderr
    assert "gpu01 gpu02 big7 big9 big10" in r.stdout  # nodelist expanded (scontrol's rules)
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    # srun does not inherit sbatch's --cpus-per-task since Slurm 22.05: it is passed explicitly
    assert cmd[:cmd.index("torchrun")] == ["srun", "--nodes", "5", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                                           "--cpus-per-task", "32"]
    assert cmd[cmd.index("torchrun"):] == [
        "torchrun", "--nnodes", "5", "--nproc-per-node", "8", "--rdzv-id", "42", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "gpu01:29500", "-m", "training", "--config", CONFIG, "train.max_steps=3"]
    assert run(SLURM, CONFIG, "train.max_steps=3", env=env, **slurm).returncode == 0
    assert [c["node"] for c in calls()] == ["0", "1", "2", "3", "4"]  # one torchrun per node
    assert all(["torchrun", *c["argv"]] == cmd[cmd.index("torchrun"):] for c in calls())


def test_slurm_deepspeed_generates_a_hostfile(tmp_path, fakes):
    env, calls = fakes
    slurm = dict(SLURM_JOB_NODELIST="gpu[01-02]", SLURM_GPUS_ON_NODE="4", SLURM_JOB_ID="7", LAUNCHER="deepspeed",
                 ARENA_ROOT=str(ROOT))
    (tmp_path / "run.yaml").write_text((ROOT / CONFIG).read_text())
    r = subprocess.run(["bash", str(SLURM), "run.yaml", "data.train_csv=/d/a b.csv"], cwd=tmp_path,
                       env={**env, **slurm, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "#   gpu01 slots=4\n#   gpu02 slots=4" in r.stdout
    r = subprocess.run(["bash", str(SLURM), "run.yaml", "data.train_csv=/d/a b.csv"], cwd=tmp_path,
                       env={**env, **slurm}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    hostfile = str(tmp_path / ".arena-hostfile-7")
    for node, call in enumerate(calls()):
        assert call["argv"] == ["--no_ssh", "--node_rank", str(node), "--hostfile", hostfile, "--master_addr",
                                "gpu01", "--master_port", "29500", "--module", "training", "--config", "run.yaml",
                                "data.train_csv=/d/a b.csv"]
        assert call["files"]["--hostfile"] == "gpu01 slots=4\ngpu02 slots=4\n"
    assert len(calls()) == 2 and not Path(hostfile).exists()  # removed when the job ends


def test_slurm_without_cpus_per_task_warns(fakes):
    env, _ = fakes
    r = run(SLURM, CONFIG, env=env, DRY_RUN="1", SLURM_JOB_NODELIST="gpu01", SLURM_GPUS_ON_NODE="8",
            SLURM_SUBMIT_DIR=str(ROOT))
    assert r.returncode == 0 and "SLURM_CPUS_PER_TASK is unset" in r.stderr
    assert "--cpus-per-task" not in r.stdout
    r = run(SLURM, CONFIG, env=env, DRY_RUN="1", SLURM_JOB_NODELIST="gpu01", SLURM_GPUS_ON_NODE="8",
            SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_PER_TASK="x")
    assert r.returncode == 2 and "SLURM_CPUS_PER_TASK" in r.stderr


def test_slurm_outside_an_allocation_says_so(fakes):
    env, _ = fakes
    r = run(SLURM, CONFIG, env=env)
    assert r.returncode == 2 and "sbatch" in r.stderr


# ------------------------------------------------------------------------------------------------ a real launch


@pytest.mark.distributed
def test_train_sh_launches_a_real_two_process_cpu_run(tmp_path, sample_dir):
    """launch/train.sh -> deepspeed -> python -m training, 2 CPU processes (gloo), from outside the repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_VISIBLE", "DRY_RUN"))}
    env.update(OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    r = subprocess.run(
        ["bash", str(TRAIN), str(ROOT / CONFIG), "2", f"data.train_csv={sample_dir / 'train.csv'}",
         f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_every=0", "train.save_every=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert any(row.get("step") == 2 for row in rows)
    assert (tmp_path / "run/final/arena.json").exists()


def test_gpu_smoke_on_a_cpu_exits_at_once_with_a_clear_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: run bench/gpu_smoke.py itself")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "no CUDA GPU visible" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"gpu": False, "ran": []}
