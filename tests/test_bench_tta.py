"""The CPU-checkable parts of bench/tta.py (offline curves) and bench/inference.py (--calibrate, the projection)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests.conftest import ROOT


def bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tta_curves_uncertainty_first_vs_random():
    tta = bench("tta")
    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 3, n)
    confident = rng.random(n) < 0.6
    # confident rows: view 1 right and sure, the swapped view the same (nothing to gain); uncertain rows: view 1
    # leans wrong, the swapped view (in swapped class order) leans right, so their TTA average helps
    p1, p2 = np.full((n, 3), 0.1), np.full((n, 3), 0.1)
    p1[np.arange(n), labels] = np.where(confident, 0.8, 0.1)
    p1[np.arange(n), (labels + 1) % 3] = np.where(confident, 0.1, 0.45)
    p1[np.arange(n), (labels + 2) % 3] = np.where(confident, 0.1, 0.45)
    swap = np.array([1, 0, 2])
    p2[np.arange(n), swap[labels]] = 0.8
    c = tta.curves(p1, p2, labels, seeds=5)
    assert c["shares"] == list(tta.SHARES)
    assert c["uncertainty_first"][0] == pytest.approx(c["random"][0])  # no swaps: the same
    assert c["uncertainty_first"][-1] == pytest.approx(c["random"][-1])  # all swaps: the same
    i = c["shares"].index(0.33)
    assert c["uncertainty_first"][i] < c["random"][i] - 0.05
    g = tta.gain_share(c)
    assert g["full_tta_gain"] > 0 and g["uncertainty_first_share_of_gain"] > 0.7
    assert 0.2 < g["random_share_of_gain"] < 0.45  # random order reaches about a third at a third

    no_gain = tta.curves(p1, p1[:, swap], labels, seeds=2)  # the swapped view adds nothing
    assert tta.gain_share(no_gain)["uncertainty_first_share_of_gain"] is None


def test_calibrate_needs_a_gpu_unless_allowed(tmp_path, capsys, monkeypatch):
    import torch

    inf = bench("inference")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "calib.json"
    assert inf.main(["--calibrate", "--out", str(out)]) == 2
    cap = capsys.readouterr()
    assert "needs a CUDA GPU" in cap.err and json.loads(cap.out.strip().splitlines()[-1]) == {"gpu": False}
    assert not out.exists()

    assert inf.main(["--calibrate", "--allow-cpu", "--out", str(out), "--calib-iters", "2", "--calib-warmup", "1"]) == 0
    cal = json.loads(out.read_text())
    assert cal["gpu"].startswith("cpu") and cal["seconds"]["fp16"] > 0
    assert cal["slowdown_8bit"] > 0 and cal["slowdown_4bit"] > 0, cal  # bitsandbytes runs on the CPU too

    factors = inf.read_calibration(out, inf.assumptions())
    assert factors["slowdown_4bit"] == {"value": cal["slowdown_4bit"], "source": "measured on cpu (logic check only)",
                                        "why": factors["slowdown_4bit"]["why"]}
    assert factors["mfu"]["source"] == "assumed"  # a CPU's (or non-T4's) absolute rate is not a T4's

    monkeypatch.setattr(inf, "T4_ROWS", 1000)  # the projection's logic, quicker
    full = np.random.default_rng(0).integers(50, 3000, 500)
    base = inf.project(full, inf.assumptions())
    doubled = inf.assumptions()
    doubled["slowdown_4bit"]["value"] *= 2
    slow = inf.project(full, doubled)
    b, s = base["modes"], slow["modes"]
    oh = inf.assumptions()["overhead_hours"]["value"]
    assert s["dp_4bit/on"]["hours"] - oh == pytest.approx(2 * (b["dp_4bit/on"]["hours"] - oh))
    assert s["pipeline_fp16/on"] == b["pipeline_fp16/on"]
    for t in (b, s):  # TTA on costs the most, off the least; every mode is slower than the physical limit
        for m in ("dp_4bit", "dp_8bit", "pipeline_fp16"):
            assert t[f"{m}/off"]["hours"] < t[f"{m}/auto_1/3"]["hours"] < t[f"{m}/on"]["hours"]
            assert t[f"{m}/on"]["ratio_to_limit"] > 1
