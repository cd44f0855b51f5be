"""The Kaggle launch scripts: the notebook's command line and the wheelhouse recipe (dry runs: no network)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_kaggle_kernel_builds_the_predict_command(tmp_path):
    env = {**os.environ, "ARENA_DRY_RUN": "1", "ARENA_WHEELHOUSE": "", "ARENA_MODELS": "/m/a,/m/b",
           "ARENA_WEIGHTS": "0.7,0.3", "ARENA_BASE_MODELS": "/base", "ARENA_TEST_CSV": "/data/test.csv",
           "ARENA_OUT": str(tmp_path / "submission.csv"), "ARENA_TTA": "0", "ARENA_MAX_LENGTH": "1536"}
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "kaggle_kernel.py")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cmd = [line for line in out.stdout.splitlines() if "-m inference" in line][0]
    for part in ("--test /data/test.csv", "--devices cpu", "--quantize 4bit", "--parallel data", "--no-tta", "--model /m/a --model /m/b",
                 "--weights 0.7,0.3", "--base-model /base", "--max-length 1536", "--time-budget "):
        assert part in cmd, (part, cmd)
    budget = int(cmd.split("--time-budget ")[1].split()[0])
    assert 8 * 3600 < budget < 9 * 3600 - 15 * 60  # the 9 h limit minus elapsed time and the safety margin


def test_kaggle_kernel_passes_the_pipeline_option(tmp_path):
    env = {**os.environ, "ARENA_DRY_RUN": "1", "ARENA_WHEELHOUSE": "", "ARENA_PARALLEL": "pipeline",
           "ARENA_QUANTIZE": "none", "ARENA_OUT": str(tmp_path / "submission.csv")}
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "kaggle_kernel.py")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cmd = [line for line in out.stdout.splitlines() if "-m inference" in line][0]
    assert "--parallel pipeline" in cmd and "--quantize none" in cmd, cmd


def test_wheelhouse_recipe_excludes_torch_and_reads_setup_py():
    out = subprocess.run(["bash", str(ROOT / "launch" / "build_wheelhouse.sh"), "/tmp/never-written"],
                         env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    reqs = [line for line in out.stdout.splitlines() if line.startswith("requirements")][0].split(":", 1)[1]
    assert "transformers" in reqs and "peft" in reqs and "bitsandbytes" in reqs and "torch" not in reqs
    assert "pip wheel --no-deps" in out.stdout and "--no-deps each resolved" in out.stdout
    assert "-c " in out.stdout  # resolved through the lock (constraints.txt)
    assert not os.path.exists("/tmp/never-written")
