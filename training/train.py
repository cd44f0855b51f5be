"""Fine-tune a preference classifier with DeepSpeed (ZeRO-3 by default): setup, one training loop, export.

    arena-train --config configs/tiny/llama_cpu.yaml                       # one CPU process
    deepspeed --num_gpus 8 --module training --config configs/gemma2/9b_full.yaml
    torchrun --nproc_per_node 8 -m training --config configs/llama3/8b_full.yaml

Reads top to bottom: processes and data, model and engine, resume, the loop (forward, backward, step, evaluate,
checkpoint), then the export of the best (or last) model to output_dir/final/ with its validation predictions,
temperature, class prior and report.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from inference.submission import softmax, tta_average

from .checkpoint import (check_resumable, find_resume, load_checkpoint, recover_dir, replace_dir, save_checkpoint,
                         write_atomic)
from .config import RunConfig, deepspeed_config, to_dict
from .distributed import Dist, all_gather_objects, all_mean, setup_distributed
from . import report
from .export import export_model
from .inputs import (eval_shard, examples_of, forward_kwargs, load_splits, make_collate, make_sampler, micro_batches,
                     prepare_tokenizer, to_device)
from .losses import distill_loss
from .metrics import MetricsLogger
from .model import (attn_implementation_of, build_model, count_params, hf_config, hidden_size, make_optimizer,
                    make_scheduler, train_dtype)

log = logging.getLogger("training")

PREDICTIONS_FILE = "val_predictions.npz"
START_PREDICTIONS_FILE = "val_predictions_start.npz"  # train.eval_at_start: the model before the first update


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf: the run stops before the bad update reaches a checkpoint."""


def run(cfg: RunConfig) -> Path | None:
    """Train, then export to output_dir/final/. Returns the export directory (None when stopped early on purpose)."""
    dist = setup_distributed()
    _setup_logging(dist)
    _seed_everything(cfg.train.seed)  # same seed on every rank: identical initial weights before partitioning
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))  # the resolved run config
        for name in ("final", "best"):
            if recover_dir(out / name):
                log.warning("restored %s/ from a crash during its replacement", out / name)
    check_memory_plan(cfg, dist)
    if cfg.model.name_or_path:  # a missing local dir, or a hub id offline with nothing cached: one line, now
        from data.tokenizer import resolve_pretrained

        resolve_pretrained(cfg.model.name_or_path)
    origin = _init_origin(cfg, dist)  # model.init_from: the export this run starts from (None otherwise)

    # ---- data
    tokenizer = prepare_tokenizer(cfg, dist)
    splits = load_splits(cfg, tokenizer, dist)
    sampler = make_sampler(cfg, splits.train, dist)
    collate = make_collate(cfg, tokenizer.pad_token_id)
    gas = cfg.train.gradient_accumulation_steps
    steps_per_epoch = len(sampler) // gas
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    if total_steps < 1:
        raise ValueError(f"{len(sampler)} micro-batches per epoch are fewer than gradient_accumulation_steps={gas}")

    # ---- model and engine
    import deepspeed

    hf_cfg = hf_config(cfg, tokenizer)
    dtype = train_dtype(cfg, dist.device)
    ds_config = deepspeed_config(cfg, dist.world_size, hidden_size(hf_cfg), bf16=dtype == torch.bfloat16)
    hf_ds_config = None
    if cfg.deepspeed.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # Must exist BEFORE the model is built: from_config/from_pretrained then create partitioned parameters.
        # transformers keeps only a weak reference, so this variable keeps it alive for the whole run.
        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841
    model = build_model(cfg, tokenizer, hf_cfg, ds_config, dist.device)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)

    # ---- resume
    state = {"step": 0, "sampler": sampler.state_dict(), "best_val": None, "best_step": None}
    ckpt = find_resume(cfg)
    if ckpt is not None:
        state = check_resumable(cfg, ckpt, dist)
        load_checkpoint(engine, ckpt, dist)
        sampler.load_state_dict(state["sampler"])
        _forget_best_after(out, state)
        log.info("resumed from %s at step %d", ckpt, state["step"])
    _write_run_info(cfg, dist, model, splits, total_steps, steps_per_epoch, origin)
    logger = MetricsLogger(cfg, dist.is_main, state["step"] if ckpt is not None else None)
    last_good = ckpt
    if cfg.train.eval_at_start and splits.valid is not None and ckpt is None:
        # where the run starts (e.g. an init_from export's own validation log loss), before any update
        ev = evaluate(engine, splits.valid, cfg, tokenizer.pad_token_id, dist)
        logger.log({"step": 0, "val_logloss": ev["val_logloss"], "val_accuracy": ev["val_accuracy"],
                    "val_logloss_no_tta": ev["val_logloss_no_tta"]})
        if dist.is_main:
            save_predictions(out / START_PREDICTIONS_FILE, ev)
        log.info("validation log loss before the first update: %.4f", ev["val_logloss"])

    # ---- the loop: gas micro-batches per optimizer step; DeepSpeed scales, reduces, clips and steps
    stream = micro_batches(sampler, splits.train, collate, cfg.data.full_swap, dist.world_size)
    attn = attn_implementation_of(model)
    if cfg.data.packing:
        from data.packing import check_packed_attention

        check_packed_attention(attn, hf_cfg.model_type)
    bar = _progress(total_steps, state["step"], dist)
    preds = None  # validation predictions of the exported model
    while state["step"] < total_steps:
        engine.train()
        t0, loss_sum, rows = time.time(), 0.0, 0
        lr = optimizer.param_groups[0]["lr"]
        for _ in range(gas):
            batch, denominator = next(stream)
            batch = to_device(batch, dist.device)
            logits = engine(**forward_kwargs(batch, cfg.data.packing, attn))
            dl = cfg.train.distill
            loss = distill_loss(logits, batch["labels"], batch["soft"], batch["soft_mask"], alpha=dl.alpha,
                                temperature=dl.temperature, cosine=dl.cosine,
                                label_smoothing=cfg.train.label_smoothing) / denominator
            value = all_mean(loss.item(), dist)  # every rank sees the same value, so all stop together
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"training loss is {value} at step {state['step'] + 1}: stopping before the update. "
                    f"Last good checkpoint: {last_good or 'none written yet'} (resume=auto continues from it); "
                    "lower train.lr, check train.max_grad_norm or the data")
            engine.backward(loss)
            engine.step()
            loss_sum += value
            rows += denominator * dist.world_size  # the micro-step's examples on all ranks
        if not engine.was_step_applied():
            # bf16/fp32 have no loss scaling: a skipped update means inf/NaN gradients, which DeepSpeed would
            # otherwise skip with a warning at every step while the run "succeeds"
            raise NonFiniteLoss(
                f"non-finite gradients at step {state['step'] + 1} (DeepSpeed skipped the update). "
                f"Last good checkpoint: {last_good or 'none written yet'}; lower train.lr or set train.max_grad_norm")
        state["step"] += 1
        state["sampler"] = sampler.state_dict()
        step = state["step"]
        record = {"step": step, "loss": loss_sum / gas, "lr": lr, "grad_norm": _float(engine.get_global_grad_norm()),
                  "epoch": round(state["sampler"]["epoch"] + state["sampler"]["step"] / max(1, len(sampler)), 4),
                  "rows": int(round(rows)), "step_time": round(time.time() - t0, 4)}

        if splits.valid is not None and ((cfg.train.eval_every and step % cfg.train.eval_every == 0)
                                         or step == total_steps):
            ev = evaluate(engine, splits.valid, cfg, tokenizer.pad_token_id, dist)
            record.update(val_logloss=ev["val_logloss"], val_accuracy=ev["val_accuracy"],
                          val_logloss_no_tta=ev["val_logloss_no_tta"])
            if state["best_val"] is None or ev["val_logloss"] < state["best_val"]:
                state["best_val"], state["best_step"] = ev["val_logloss"], step
                if cfg.train.export == "best":
                    _export(engine.module, cfg, tokenizer, dist, out / "best", ev, step, splits.prior, origin)
            if cfg.train.export == "last":
                preds = ev
        if step % cfg.train.log_every == 0 or "val_logloss" in record or step == total_steps:
            logger.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", **({"val": f"{record['val_logloss']:.4f}"}
                                                          if "val_logloss" in record else {}))
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:  # the end exports
            last_good = save_checkpoint(engine, cfg, dist, state)
        if cfg.train.stop_after_steps and step >= cfg.train.stop_after_steps:
            log.warning("train.stop_after_steps=%d reached: stopping without export", step)
            logger.close()
            return None
    bar.close()

    # ---- export: final/ = the best model (or the last), with its validation predictions and calibration
    final = out / "final"
    if cfg.train.export == "best" and dist.is_main:
        replace_dir(out / "best", final)
        preds = dict(np.load(final / PREDICTIONS_FILE))
    elif cfg.train.export == "last":
        _export(engine.module, cfg, tokenizer, dist, final, preds, state["step"], splits.prior, origin)
    dist.barrier()
    if dist.is_main:
        finish_export(cfg, final, preds)
    logger.close()
    return final


def evaluate(engine, ds, cfg: RunConfig, pad_id: int, dist: Dist) -> dict:
    """Log loss / accuracy of the model on `ds`, plus the logits (every rank returns the same result)."""
    from data.batching import collate_padded
    from data.scoring import accuracy, log_loss

    bs = cfg.data.eval_batch_size or 2 * cfg.data.micro_batch_size
    batches = eval_shard(len(ds), dist.world_size, dist.rank, ds["length"], bs)
    engine.eval()
    idx, out = [], []
    with torch.no_grad():
        for b in batches:
            # each row followed by its A/B swap: validation scores what inference serves (swap TTA)
            batch = collate_padded(examples_of(ds, b, full_swap=True), pad_id)
            logits = engine(**forward_kwargs(to_device(batch, dist.device), packing=False, attn_implementation=""))
            idx += b
            out.append(logits.float().cpu().numpy())
    engine.train()
    logits, logits_swap = np.full((len(ds), 3), np.nan), np.full((len(ds), 3), np.nan)
    for i, lg in all_gather_objects((idx, np.concatenate(out)), dist):
        logits[i], logits_swap[i] = lg[0::2], lg[1::2]  # the padding repeats of index 0 write identical values
    labels = np.asarray(ds["label"])
    probs = tta_average(softmax(logits), softmax(logits_swap))
    return {"val_logloss": log_loss(probs, labels), "val_accuracy": accuracy(probs, labels),
            "val_logloss_no_tta": log_loss(softmax(logits), labels), "logits": logits, "logits_swap": logits_swap,
            "probs": probs, "labels": labels, "ids": np.asarray(ds["id"])}


def _export(module, cfg, tokenizer, dist, out_dir: Path, ev: dict | None, step: int, prior,
            origin: dict | None = None) -> None:
    """Export (collective) and, on rank 0, store the exported model's validation predictions next to it."""
    extra = {"step": step, "prior": prior}
    if origin is not None:
        extra["init_from"] = origin
    if ev is not None:
        extra["val_logloss"] = ev["val_logloss"]
    export_model(module, cfg, tokenizer, dist, out_dir, **extra)
    if dist.is_main and ev is not None:
        save_predictions(out_dir / PREDICTIONS_FILE, ev)


def save_predictions(path: Path, ev: dict) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **{k: ev[k] for k in ("probs", "labels", "logits", "logits_swap", "ids")})
    os.replace(tmp, path)


def finish_export(cfg: RunConfig, final: Path, preds: dict | None) -> None:
    """Rank 0: val_predictions.npz in the run dir, temperature into arena.json, the report (if helper modules exist)."""
    from inference.modeling import read_meta, save_meta

    out = Path(cfg.output_dir)
    meta = read_meta(final)
    if meta.get("adapter") and (final / "base").is_dir():  # base weights written inside the export moved with it
        meta["base_model"] = str((final / "base").resolve())
    if preds is not None:
        save_predictions(out / PREDICTIONS_FILE, preds)
    if preds is not None and cfg.train.temperature_scaling:
        # one temperature for the TTA average (the default) and one for a single view (--no-tta)
        meta["temperature"] = float(report.fit_temperature(preds["logits"], preds["labels"],
                                                           logits_swap=preds["logits_swap"]))
        meta["temperature_no_tta"] = float(report.fit_temperature(preds["logits"], preds["labels"]))
    save_meta(final, meta)
    if preds is not None:
        # the report's headline is what arena-predict serves: the A/B-swap average with the export's temperature
        report.write_report(out, temperature=meta.get("temperature", 1.0),
                            temperature_no_tta=meta.get("temperature_no_tta", meta.get("temperature", 1.0)))
    log.info("exported %s (temperature %.3f)", final, meta["temperature"])


def check_memory_plan(cfg: RunConfig, dist: Dist) -> None:
    """On GPU, refuse to start a run whose per-GPU memory plan does not fit (hardware.check_memory=false skips)."""
    if dist.device.type != "cuda" or not cfg.hardware.check_memory:
        return
    from .plan import PlanError, plan_for_config

    gpus = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 0) or torch.cuda.device_count()))
    try:
        plan_for_config(cfg, gpus_per_node=gpus, nodes=max(1, dist.world_size // gpus)).require_fit()
    except PlanError as e:  # render() already lists the advice
        raise SystemExit(f"the memory plan does not fit, refusing to start: {e}\n"
                         "(hardware.check_memory=false starts anyway)") from None


def _forget_best_after(out: Path, state: dict) -> None:
    """A best/ export from after the resumed checkpoint (lost steps), or none at all: forget the best so far, so that
    the next evaluation exports again."""
    meta = out / "best" / "arena.json"
    if state.get("best_step") is not None and (
            not meta.exists() or json.loads(meta.read_text()).get("step") != state["best_step"]):
        state["best_val"] = state["best_step"] = None


def _init_origin(cfg: RunConfig, dist: Dist) -> dict | None:
    """model.init_from: the source export's record (path, step, val log loss); warns when the run's template differs
    from the one the export was trained with."""
    if not cfg.model.init_from:
        return None
    from .init_from import check_source, format_differences, origin_record

    meta = check_source(cfg)
    changed = format_differences(meta.get("format") or {}, cfg.data.format.to_dict())
    if changed and dist.is_main:
        log.warning("data.format differs from the format model.init_from=%s was trained with (%s): the model will "
                    "see another template", cfg.model.init_from, "; ".join(changed))
    return origin_record(cfg, meta)


def _write_run_info(cfg, dist: Dist, model, splits, total_steps: int, steps_per_epoch: int,
                    origin: dict | None = None) -> None:
    counts = all_gather_objects(count_params(model), dist)
    if dist.is_main:
        info = {"world_size": dist.world_size, "device": str(dist.device), "zero_stage": cfg.deepspeed.zero_stage,
                "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "train_rows": len(splits.train),
                "valid_rows": len(splits.valid) if splits.valid is not None else 0, "prior": splits.prior,
                "params_per_rank": counts, "init_from": origin}
        write_atomic(Path(cfg.output_dir) / "run_info.json", json.dumps(info, indent=2))


def _float(x) -> float | None:
    return None if x is None else float(x)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress(total: int, initial: int, dist: Dist):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not dist.is_main)


def _setup_logging(dist: Dist) -> None:
    # DeepSpeed's own collectives use torch names deprecated in torch 2.13: one warning per call would drown the log
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                            category=FutureWarning)
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING,
                        format=f"[rank{dist.rank}] %(asctime)s %(name)s: %(message)s")
