"""inference/ must run in the Kaggle kernel: no training/, no training-only dependencies."""
import subprocess
import sys

from tests.conftest import ROOT

FORBIDDEN = ("training", "deepspeed", "datasets", "accelerate", "wandb", "matplotlib")


def test_inference_imports_nothing_from_training_or_train_extras():
    code = (
        "import sys, pkgutil, importlib, inference\n"
        "for m in pkgutil.iter_modules(inference.__path__):\n"
        "    importlib.import_module('inference.' + m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"inference imported {r.stdout.strip()}"
