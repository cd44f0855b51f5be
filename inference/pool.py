"""The main process's side of the workers: start one process per device, message them, notice deaths, stop them.

Only processes started here are ever terminated, each by its own handle.
"""
from __future__ import annotations

import os
import queue
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


def parse_devices(text: str) -> list[str]:
    """'auto' (every CUDA GPU, else one CPU worker), 'cpu', 'cpu:2' (two CPU workers), 'cuda', 'cuda:0,cuda:1'.

    Raises ValueError naming the bad entry.
    """
    import torch

    text = (text or "auto").strip()
    if text == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if text == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not n:
            raise ValueError("--devices cuda: no CUDA GPU is visible (use --devices cpu or auto)")
        return [f"cuda:{i}" for i in range(n)]
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part == "cpu":
            out.append("cpu")
        elif part.startswith("cpu:") and part[4:].isdigit() and int(part[4:]) >= 1:
            out += ["cpu"] * int(part[4:])
        elif part.startswith("cuda:") and part[5:].isdigit():
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if int(part[5:]) >= n:
                raise ValueError(f"--devices {part}: only {n} CUDA device(s) visible")
            out.append(part)
        else:
            raise ValueError(f"--devices: cannot parse {part!r} (use auto, cpu, cpu:N, cuda or cuda:0,cuda:1)")
    return out


def worker_visibility(device: str, parent_visible: str | None) -> tuple[str | None, str]:
    """(CUDA_VISIBLE_DEVICES for the worker, the device name inside it). A GPU worker sees only its own GPU, as
    cuda:0: with torch.cuda.set_device alone, any library call that touches device 0 (bitsandbytes, a stray
    .cuda()) would open a second CUDA context (300-500 MB) on GPU 0. Indices are relative to the parent's own
    CUDA_VISIBLE_DEVICES, if it has one. CPU workers see no GPU at all (None leaves the variable as it is)."""
    if not device.startswith("cuda"):
        return None, device
    index = int(device.partition(":")[2] or 0)
    ordinals = [x.strip() for x in (parent_visible or "").split(",") if x.strip()]
    if not ordinals:
        return str(index), "cuda:0"
    if index >= len(ordinals):
        raise ValueError(f"{device}: CUDA_VISIBLE_DEVICES={parent_visible} makes only {len(ordinals)} visible")
    return ordinals[index], "cuda:0"


@contextmanager
def _environ(name: str, value: str | None):
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@dataclass
class WorkerHandle:
    index: int
    device: str
    process: object
    inbox: object
    loaded: int | None = None  # the model index last asked to load
    outstanding: list[int] = field(default_factory=list)  # batch ids sent and not yet answered
    batches_done: int = 0
    dead_since: float | None = None
    lost: bool = False  # death already handled
    stopping: bool = False
    note: str = ""  # what replaced it when it died (a pipeline group's fallback), for the loss message


class WorkerPool:
    def __init__(self, devices: list[str]):
        import torch.multiprocessing as mp

        self.ctx = mp.get_context("spawn")  # CUDA cannot be forked
        self.devices = devices
        self.outbox = self.ctx.Queue()
        self.workers: list[WorkerHandle] = []

    def start(self, target=None) -> None:
        """One process per device; `target` replaces inference.worker.worker_main (tests)."""
        if target is None:
            from inference.worker import worker_main as target

        n_cpu = sum(d == "cpu" for d in self.devices)
        threads = max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu else 0
        for i, dev in enumerate(self.devices):
            inbox = self.ctx.Queue()
            visible, local = worker_visibility(dev, os.environ.get("CUDA_VISIBLE_DEVICES"))
            p = self.ctx.Process(target=target, args=(i, local, threads, inbox, self.outbox), daemon=True,
                                 name=f"arena-worker-{i}")
            with _environ("CUDA_VISIBLE_DEVICES", visible):  # a spawned child copies the environment at start
                p.start()
            self.workers.append(WorkerHandle(i, dev, p, inbox))

    def alive(self) -> list[WorkerHandle]:
        return [w for w in self.workers if not w.lost]

    def send(self, w: WorkerHandle, msg) -> None:
        w.inbox.put(msg)

    def get(self, timeout: float):
        try:
            return self.outbox.get(timeout=max(0.01, timeout))
        except queue.Empty:
            return None

    def newly_dead(self, grace: float = 1.0, now: float | None = None) -> list[WorkerHandle]:
        """Workers whose process has exited (unasked) for more than `grace` seconds (so their last messages
        have arrived); each is reported once."""
        now = time.monotonic() if now is None else now
        out = []
        for w in self.workers:
            if w.lost or w.stopping or w.process.exitcode is None:
                continue
            if w.dead_since is None:
                w.dead_since = now
            if now - w.dead_since >= grace:
                w.lost = True
                out.append(w)
        return out

    def shutdown(self, wait: float) -> None:
        """Ask every worker to stop, wait up to `wait` seconds, then terminate the ones still running."""
        for w in self.workers:
            w.stopping = True
            if w.process.exitcode is None:
                try:
                    w.inbox.put(("stop",))
                except (OSError, ValueError):
                    pass
        end = time.monotonic() + wait
        for w in self.workers:
            w.process.join(max(0.0, end - time.monotonic()))
        for w in self.workers:
            if w.process.exitcode is None:
                w.process.terminate()
        for w in self.workers:
            w.process.join(2.0)
            if w.process.exitcode is None:
                w.process.kill()
                w.process.join(1.0)
        for q in [self.outbox, *(w.inbox for w in self.workers)]:
            q.cancel_join_thread()  # never block exit on a queue nobody will read
            q.close()
