"""CPU twins of inference paths written for the T4s: the fp32 re-run of rows whose fp16 logits overflowed, one
GPU per worker through CUDA_VISIBLE_DEVICES, and weights loaded straight onto the worker's device."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from inference.loading import placement_kwargs
from inference.pool import WorkerPool, worker_visibility
from inference.upcast import fp32_compute
from inference.worker import Runner
from tests.conftest import tiny_classifier


def overflowing_fp16_model():
    """A tiny Llama classifier whose layer-0 MLP activations reach ~1e7 (beyond fp16's 65504) while every weight
    is representable in fp16: in fp16 the logits are NaN, in fp32 they are finite."""
    model = tiny_classifier("llama", seed=3)
    with torch.no_grad():
        model.backbone.layers[0].post_attention_layernorm.weight.fill_(1000.0)
    half = copy.deepcopy(model)
    half.backbone.half()  # the head stays fp32, as load_pretrained keeps it
    reference = copy.deepcopy(half)
    reference.backbone.float()  # the same (fp16-rounded) weights, computed in fp32
    return half, reference


def seqs(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 1000, size=int(rng.integers(5, 40))).astype(np.int64) for _ in range(n)]


def test_fp16_overflow_is_real_and_fp32_rerun_matches_fp32_compute():
    half, reference = overflowing_fp16_model()
    batch = seqs()
    raw = Runner(half, "cpu").forward(batch, 0)
    assert not np.isfinite(raw).all(), "the model must overflow in fp16 for this test to mean anything"
    before = {k: v.clone() for k, v in half.state_dict().items()}
    runner = Runner(half, "cpu")
    logits = runner.run(batch, 0)
    assert np.isfinite(logits).all()
    assert runner.fp32_reruns == int((~np.isfinite(raw).all(axis=1)).sum()) > 0
    expected = Runner(reference, "cpu").forward(batch, 0)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    after = half.state_dict()  # weights back in fp16, bit for bit; no hooks left behind
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in half.modules())


def test_fp32_compute_of_a_healthy_fp16_model_is_close_to_fp16():
    model = tiny_classifier("llama", seed=1)
    model.backbone.half()
    batch = seqs(3, seed=1)
    fp16 = Runner(model, "cpu").forward(batch, 0)
    with fp32_compute(model):
        fp32 = Runner(model, "cpu").forward(batch, 0)
    assert np.isfinite(fp16).all()
    np.testing.assert_allclose(fp32, fp16, atol=2e-2)
    runner = Runner(model, "cpu")
    runner.run(batch, 0)
    assert runner.fp32_reruns == 0  # finite rows are never re-run


@pytest.mark.parametrize("device, parent, expected", [
    ("cuda:1", None, ("1", "cuda:0")),
    ("cuda:0", None, ("0", "cuda:0")),
    ("cuda:1", "4,6", ("6", "cuda:0")),  # indices are the parent's visible ones
    ("cuda", "3", ("3", "cuda:0")),
    ("cpu", "0,1", (None, "cpu")),
])
def test_each_gpu_worker_sees_only_its_own_gpu(device, parent, expected):
    assert worker_visibility(device, parent) == expected


def test_worker_visibility_refuses_an_invisible_index():
    with pytest.raises(ValueError, match="only 2 visible"):
        worker_visibility("cuda:2", "0,1")


def report_environment(index, device, threads, inbox, outbox):
    outbox.put((index, device, os.environ.get("CUDA_VISIBLE_DEVICES")))


def test_pool_starts_workers_with_their_own_cuda_visible_devices(monkeypatch):
    """Real spawned processes (no GPU needed: the stand-in worker only reports what it was started with)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    pool = WorkerPool(["cuda:0", "cuda:1", "cpu"])
    pool.start(target=report_environment)
    try:
        got = sorted(pool.get(timeout=60) for _ in range(3))
    finally:
        pool.shutdown(wait=5)
    assert got == [(0, "cuda:0", "5"), (1, "cuda:0", "7"), (2, "cpu", "5,7")]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"  # the parent's own environment is left as it was


def test_weights_load_straight_onto_the_worker_device():
    assert placement_kwargs("cuda:0") == {"device_map": {"": "cuda:0"}}
    q = object()
    assert placement_kwargs("cuda:0", q) == {"device_map": {"": "cuda:0"}, "quantization_config": q}


def test_rows_lost_to_out_of_memory_are_not_rerun_in_fp32():
    half, _ = overflowing_fp16_model()
    runner = Runner(half, "cpu", oom_above=1)  # even one row "runs out of memory"
    logits = runner.run(seqs(3), 0)
    assert np.isnan(logits).all() and runner.ooms > 0 and runner.fp32_reruns == 0
