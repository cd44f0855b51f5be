"""Metrics: one JSON object per logged step in output_dir/metrics.jsonl (rank 0), mirrored to wandb when enabled.

The JSONL file is the record the report and the resume tests read. On resume, rows after the checkpoint's step are
dropped (they belong to the interrupted run's lost steps), so the file always tells one continuous story.
"""
from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path

from .checkpoint import write_atomic
from .config import RunConfig, to_dict

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, cfg: RunConfig, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = Path(cfg.output_dir) / METRICS_FILE
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            write_atomic(self.path, "".join(ln + "\n" for ln in keep))
        if cfg.wandb.enabled:
            self.wandb = _init_wandb(cfg)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(cfg: RunConfig):
    try:
        import wandb  # only when enabled: wandb is a heavy optional dependency
    except ImportError:
        raise ImportError("wandb.enabled=true needs wandb: pip install 'arena-pref[train]'") from None
    out = Path(cfg.output_dir)
    id_file = out / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]  # kept for resume
    write_atomic(id_file, run_id)
    w = cfg.wandb
    wandb.init(project=w.project, entity=w.entity, name=w.name, id=run_id, resume="allow", dir=str(out),
               config=to_dict(cfg))
    return wandb
