"""Packing in the real training loop: a 2-process ZeRO-3 run (gloo) with data.packing lowers the loss like padding.

One launch trains twice in the same two processes (padded, then packed) to pay the ~20 s start-up once:
    python -m torch.distributed.run --nproc_per_node 2 -m tests.test_packing_training CSV OUT_DIR
The task is memorising 64 synthetic battles (a tiny model learns it within ~150 steps), so "learns" is unambiguous.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "tiny" / "llama_cpu.yaml"
STEPS = 150
COMMON = [f"train.max_steps={STEPS}", "train.lr=3e-3", "train.save_every=0", "train.eval_every=0", "train.export=last",
          "data.valid_fold=null", "data.format.max_length=64", "model.gradient_checkpointing=false"]
MODES = {
    "padded": ["data.micro_batch_size=4"],
    "packed": ["data.packing=true", "data.max_tokens=256", "data.micro_batch_size=1"],
}


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.distributed
def test_packed_zero3_run_learns_like_padded(tmp_path):
    from data.synthetic import write_sample

    write_sample(tmp_path / "data", rows=64, seed=0, test_rows=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "tests.test_packing_training", str(tmp_path / "data" / "train.csv"), str(tmp_path / "runs")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    curves = {mode: losses(tmp_path / "runs" / mode) for mode in MODES}
    for mode, curve in curves.items():
        assert len(curve) == STEPS, mode  # both ranks took every step (a rank short of batches would hang)
        assert (tmp_path / "runs" / mode / "final" / "arena.json").exists(), mode
    first = {m: sum(c[:20]) / 20 for m, c in curves.items()}
    last = {m: sum(c[-20:]) / 20 for m, c in curves.items()}
    print(json.dumps({"first20": first, "last20": last}))
    assert last["padded"] < 0.75 * first["padded"], (first, last)  # the task is learnable at all
    assert last["packed"] < 0.75 * first["packed"], (first, last)
    assert last["packed"] < last["padded"] + 0.15, (first, last)  # and packing learns it as well as padding


def main(csv: str, out: str) -> None:
    """Entry point of each launched process: the padded run, then the packed run, in one process group."""
    from training.config import load_config
    from training.train import run

    for mode, overrides in MODES.items():
        cfg = load_config(str(PRESET), [f"data.train_csv={csv}", f"output_dir={Path(out) / mode}", *COMMON, *overrides])
        run(cfg)


if __name__ == "__main__":
    main(*sys.argv[1:3])
