"""One inference worker process per device: load a model, turn batches of token ids into logits, report timings.

Workers hold no scheduling state: the main process (predict.py) renders every batch, decides its mode and keeps the
results, so a worker that dies loses only the batches it held, which the main process re-runs elsewhere. Started
with torch.multiprocessing "spawn" (CUDA cannot be forked); each worker owns one device and its own model copy.

Debug switches (environment variables, read once at start; used by the tests to prove the failure handling):
    ARENA_DEBUG_SLEEP_PER_BATCH=0.5    sleep this many seconds in every batch (a slow model)
    ARENA_DEBUG_EXIT_AFTER=1:1         worker 1 calls os._exit(3) after finishing 1 batch (a crash)
    ARENA_DEBUG_OOM_ABOVE=2000         batches above this many padded tokens raise out-of-memory
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import queue
import time
import traceback
import warnings

import numpy as np


def _debug_settings(index: int) -> dict:
    exit_after = None
    spec = os.environ.get("ARENA_DEBUG_EXIT_AFTER", "")
    if spec:
        w, n = spec.split(":")
        if int(w) == index:
            exit_after = int(n)
    return {
        "sleep": float(os.environ.get("ARENA_DEBUG_SLEEP_PER_BATCH", "0") or 0),
        "exit_after": exit_after,
        "oom_above": int(os.environ.get("ARENA_DEBUG_OOM_ABOVE", "0") or 0),
    }


def _oom_error():
    import torch

    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def pad_batch(seqs: list[np.ndarray], pad_id: int):
    """Right-padded (input_ids, attention_mask) tensors; the classifier pools each row's last real token."""
    from data.batching import pad_right

    return pad_right(seqs, pad_id)


class Runner:
    """Forward passes with out-of-memory recovery: halve the batch and retry the same rows."""

    def __init__(self, model, device: str, oom_above: int = 0):
        self.model = model
        self.device = device
        self.oom_above = oom_above  # debug: simulate a memory limit in padded tokens
        self.ooms = 0
        self.fp32_reruns = 0  # rows whose half-precision logits were non-finite, re-run in fp32

    def forward(self, seqs: list[np.ndarray], pad_id: int) -> np.ndarray:
        import torch

        ids, mask = pad_batch(seqs, pad_id)
        if self.oom_above and ids.numel() > self.oom_above:
            raise _oom_error()(f"debug: {ids.numel()} tokens > ARENA_DEBUG_OOM_ABOVE={self.oom_above}")
        with torch.inference_mode():
            logits = self.model(ids.to(self.device), attention_mask=mask.to(self.device))
        return logits.float().cpu().numpy()

    def run(self, seqs: list[np.ndarray], pad_id: int) -> np.ndarray:
        """Logits (n, 3) float32. Rows whose fp16/bf16 logits are not finite (an activation overflowed) are re-run
        one by one in fp32 compute (inference.upcast). A single sequence that still runs out of memory gets NaN
        (main uses fallbacks)."""
        logits, oom = self._run(seqs, pad_id)
        # rows lost to out-of-memory are not overflows: fp32 would need more memory still
        bad = np.flatnonzero(~np.all(np.isfinite(logits), axis=1) & ~oom)
        if len(bad):
            from inference.upcast import fp32_compute, runs_in_half

            if runs_in_half(self.model):
                with fp32_compute(self.model):
                    for i in bad:
                        logits[i] = self._run([seqs[i]], pad_id)[0][0]
                self.fp32_reruns += len(bad)
        return logits

    def _run(self, seqs: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(logits, rows that ran out of memory even alone)."""
        import torch

        try:
            return self.forward(seqs, pad_id), np.zeros(len(seqs), dtype=bool)
        except _oom_error():
            self.ooms += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(seqs) == 1:
                return np.full((1, 3), np.nan, dtype=np.float32), np.ones(1, dtype=bool)
            half = len(seqs) // 2
            (a, oa), (b, ob) = self._run(seqs[:half], pad_id), self._run(seqs[half:], pad_id)
            return np.concatenate([a, b]), np.concatenate([oa, ob])


def _empty_cache(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _parent_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def next_message(inbox):
    """The next message from the main process; ("stop",) once it is gone (killed: nobody would read our results)."""
    while True:
        try:
            return inbox.get(timeout=5.0)
        except queue.Empty:
            if not _parent_alive():
                return ("stop",)


def quiet_transformers() -> None:
    """Errors only, no progress bars: one "Loading weights" bar per process per model is noise in the log."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _setup_device(device: str, threads: int) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # bitsandbytes kernels run on the current device
    elif threads > 0:
        torch.set_num_threads(threads)


def worker_main(index: int, device: str, threads: int, inbox, outbox) -> None:
    """Process entry point. Messages in: ("load", model_idx, LoadSpec dict), ("batch", batch_id, model_idx, seqs,
    pad_id), ("stop",). Messages out: ("ready", index, model_idx, load_seconds), ("result", index, batch_id, logits,
    seconds, ooms, fp32_reruns), ("error", index, text)."""
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    debug = _debug_settings(index)
    runner, current, done = None, None, 0
    try:
        quiet_transformers()
        from inference.loading import LoadSpec, load_model

        _setup_device(device, threads)
        while True:
            msg = next_message(inbox)
            if msg[0] == "stop":
                break
            if msg[0] == "load":
                _, model_idx, spec = msg
                if current == model_idx:
                    continue
                runner = None  # free the previous model before loading the next (two 9B copies do not fit a T4)
                gc.collect()
                _empty_cache(device)
                t0 = time.perf_counter()
                runner = Runner(load_model(LoadSpec(**spec), device)[0], device, debug["oom_above"])
                current = model_idx
                outbox.put(("ready", index, model_idx, time.perf_counter() - t0))
                continue
            _, batch_id, model_idx, seqs, pad_id = msg
            if model_idx != current:
                raise RuntimeError(f"batch for model {model_idx} but model {current} is loaded")
            t0 = time.perf_counter()
            ooms, reruns = runner.ooms, runner.fp32_reruns
            logits = runner.run(seqs, pad_id)
            if debug["sleep"]:
                time.sleep(debug["sleep"])
            outbox.put(("result", index, batch_id, logits, time.perf_counter() - t0, runner.ooms - ooms,
                        runner.fp32_reruns - reruns))
            done += 1
            if debug["exit_after"] is not None and done >= debug["exit_after"]:
                outbox.close()
                outbox.join_thread()  # deliver the finished result first, then die like a crashed process
                os._exit(3)
    except Exception:
        outbox.put(("error", index, f"worker {index} ({device}): {traceback.format_exc()}"))
        outbox.close()
        outbox.join_thread()
        raise SystemExit(1)
