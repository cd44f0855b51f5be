"""launch/kfold.sh: usage errors, the per-fold commands of DRY_RUN=1 (fold overrides, output dirs, finished folds
skipped, each runner), the real path handing the launcher exactly those arguments, and a real 2-fold CPU run."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.test_launch_scripts import CONFIG, ROOT, fakes, run  # noqa: F401  (fakes is a fixture)

KFOLD = ROOT / "launch" / "kfold.sh"


def kfold(*args: str, env: dict | None = None, **extra_env: str):
    return run(KFOLD, *args, env=env, PYTHON=sys.executable, **extra_env)  # the interpreter that reads the YAML


def commands(stdout: str) -> list[list[str]]:
    """The fold commands a dry run prints (comment lines and the final oof line left out)."""
    lines = [ln for ln in stdout.strip().splitlines() if ln and not ln.startswith("#")]
    assert lines[-1].startswith("arena-data oof ")
    return [shlex.split(ln) for ln in lines[:-1]]


def test_syntax_strict_mode_and_usage():
    assert subprocess.run(["bash", "-n", str(KFOLD)], capture_output=True).returncode == 0
    assert KFOLD.read_text().startswith("#!/usr/bin/env bash") and "set -euo pipefail" in KFOLD.read_text()
    assert os.access(KFOLD, os.X_OK)
    for args in ((), ("--help",), (CONFIG,)):
        r = kfold(*args)
        assert r.returncode == 2 and r.stderr.startswith("usage:") and "CONFIG K" in r.stderr


@pytest.mark.parametrize("args,env,message", [
    (("missing.yaml", "3"), {}, "config file not found"),
    ((CONFIG, "1"), {}, "K must be an integer >= 2"),
    ((CONFIG, "x"), {}, "K must be an integer >= 2"),
    ((CONFIG, "3", "not-an-override"), {}, "key.sub=value"),
    ((CONFIG, "3", "data.valid_fold=1"), {}, "set per fold by this script"),
    ((CONFIG, "3", "data.num_folds=4"), {}, "set per fold by this script"),
    ((CONFIG, "3", "data.valid_csv=/v.csv"), {}, "held-out folds"),
    ((CONFIG, "3"), {"FOLD": "3"}, "FOLD must be in 0..2"),
    ((CONFIG, "3"), {"RUNNER": "multinode"}, "needs HOSTFILE"),
    ((CONFIG, "3"), {"RUNNER": "mpi"}, "RUNNER must be"),
], ids=["no-config", "one-fold", "k-not-a-number", "bad-override", "valid-fold", "num-folds", "valid-csv",
        "fold-out-of-range", "multinode-no-hostfile", "bad-runner"])
def test_wrong_arguments_fail_with_a_reason(args, env, message):
    r = kfold(*args, DRY_RUN="1", **env)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_a_config_with_a_validation_file_is_refused(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text((ROOT / CONFIG).read_text().replace("  valid_fold: 0", "  valid_csv: /v.csv"))
    r = kfold(str(cfg), "3", DRY_RUN="1")
    assert r.returncode == 2 and "sets data.valid_csv" in r.stderr
    assert kfold(str(cfg), "3", "data.valid_csv=null", DRY_RUN="1").returncode == 0


def test_dry_run_prints_each_fold_and_skips_finished_ones(tmp_path, fakes):  # noqa: F811
    env, calls = fakes
    base = tmp_path / "cv"
    (base / "fold1" / "final").mkdir(parents=True)
    (base / "fold1" / "final" / "arena.json").write_text("{}")
    r = kfold(CONFIG, "3", "train.max_steps=3", "data.train_csv=/d/a b.csv", f"output_dir={base}", env=env,
              DRY_RUN="1", NUM_GPUS="2", MASTER_PORT="29600")
    assert r.returncode == 0, r.stderr
    printed = commands(r.stdout)
    assert printed == [
        ["deepspeed", "--num_gpus", "2", "--master_port", "29600", "--module", "training", "--config", CONFIG,
         "train.max_steps=3", "data.train_csv=/d/a b.csv", "data.num_folds=3", f"data.valid_fold={k}",
         f"output_dir={base}/fold{k}"] for k in (0, 2)]
    assert f"# fold 1/3: done ({base}/fold1/final/arena.json exists), skipped" in r.stdout
    assert "1 of 3 folds finished" in r.stdout
    assert shlex.split(r.stdout.strip().splitlines()[-1]) == [
        "arena-data", "oof", *(f"{base}/fold{k}" for k in range(3)), "--out", f"{base}/oof.csv"]
    assert calls() == []  # nothing ran
    # the real path: the launcher gets exactly the printed commands, one fold after another
    r = kfold(CONFIG, "3", "train.max_steps=3", "data.train_csv=/d/a b.csv", f"output_dir={base}", env=env,
              NUM_GPUS="2", MASTER_PORT="29600")
    assert r.returncode == 0, r.stderr
    assert [["deepspeed", *c["argv"]] for c in calls()] == printed


def test_base_is_the_configs_output_dir_and_runners(tmp_path, fakes):  # noqa: F811
    env, _ = fakes
    r = kfold(CONFIG, "2", env=env, DRY_RUN="1", RUNNER="python")
    assert commands(r.stdout) == [[sys.executable, "-m", "training", "--config", CONFIG, "data.num_folds=2",
                                   f"data.valid_fold={k}", f"output_dir=runs/tiny_llama_cpu/fold{k}"] for k in (0, 1)]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-1 slots=8\n")
    r = kfold(CONFIG, "2", env=env, DRY_RUN="1", RUNNER="multinode", HOSTFILE=str(hostfile), FOLD="1")
    (cmd,) = commands(r.stdout)
    assert cmd[:3] == ["deepspeed", "--hostfile", str(hostfile)]
    assert cmd[-3:] == ["data.num_folds=2", "data.valid_fold=1", "output_dir=runs/tiny_llama_cpu/fold1"]
    r = kfold(CONFIG, "2", env=env, DRY_RUN="1", RUNNER="slurm", FOLD="0", SLURM_JOB_NODELIST="gpu01",
            SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="8", SLURM_SUBMIT_DIR=str(ROOT))
    (cmd,) = commands(r.stdout)
    assert cmd[0] == "srun" and cmd[-3:] == ["data.num_folds=2", "data.valid_fold=0",
                                             "output_dir=runs/tiny_llama_cpu/fold0"]


@pytest.mark.distributed
def test_a_real_two_fold_run_validates_every_battle_once(tmp_path, sample_dir, tiny_tokenizer_dir):
    base = tmp_path / "cv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_VISIBLE", "DRY_RUN", "FOLD", "RUNNER"))}
    env.update(OMP_NUM_THREADS="1", RUNNER="python", PYTHON=sys.executable)
    args = [str(ROOT / CONFIG), "2", f"data.train_csv={sample_dir / 'train.csv'}", f"output_dir={base}",
            f"data.tokenizer={tiny_tokenizer_dir}", "data.format.max_length=128", "data.eval_batch_size=32",
            "train.max_steps=3", "train.eval_every=0", "train.save_every=0"]  # a shared tokenizer: one cache
    r = subprocess.run(["bash", str(KFOLD), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ids = [np.load(base / f"fold{k}" / "val_predictions.npz")["ids"] for k in (0, 1)]
    assert len(ids[0]) and len(ids[1]) and not set(ids[0]) & set(ids[1])
    assert sorted(np.concatenate(ids).tolist()) == sorted(pd.read_csv(sample_dir / "train.csv", dtype={"id": str})["id"])
    assert "2 of 2 folds finished (2 trained now)" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == f"arena-data oof {base}/fold0 {base}/fold1 --out {base}/oof.csv"
    # run again: both folds are skipped, nothing trains
    again = subprocess.run(["bash", str(KFOLD), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and again.stdout.count("skipped") == 2 and "(0 trained now)" in again.stdout
