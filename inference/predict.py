"""Score a test.csv with one or more exported models on several devices, within a time budget.

    arena-predict --model /kaggle/input/my-model --test test.csv --out submission.csv --devices cuda:0,cuda:1 \\
        --time-budget 8h30m --quantize 4bit

Reads top to bottom: read the test file, write a prior-filled submission at once (so a valid file exists from the
first second), start one worker per device (they load their model copies while this process tokenizes), then the
loop: hand the longest pending rows to whichever worker has room, collect logits, re-project the finish time and
degrade the remaining rows when it overruns (budget.py), checkpoint the submission now and then. At the end (or at
the deadline) the final file is written atomically and checked.

Test-time augmentation is a second pass. Phase 1 gives every row one view (the budget's max_length ladder applies
to it). Phase 2 runs the A/B-swapped views, most uncertain row first (highest entropy of the first view's
probabilities), each at the same max_length as the row's first view so the average stays exactly symmetric:
`--tta on` all rows, a FRACTION at most ceil(FRACTION x rows), `auto` as many as the projected finish allows, `off`
none. A swap chunk is admitted only while its projected cost fits the time left (minus the first views other
models still need), so a short budget drops the least useful swaps, never the last rows' first views.

Ensembles run model after model: each model's phase 1, then its phase 2, then the next model. Phase 2 of a model
reserves the time the later models' first views need, so swaps never cost another model its first view, and no
model is loaded twice (a reload of a 9B model costs minutes). The probabilities are averaged with the given weights
(arithmetic mean of per-model probabilities, each after its own temperature and TTA). Rows a model did not reach
use the other models; rows no model reached get the prior (the weighted mean of the models' training priors, else
uniform).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from data.reading import Battle, read_battles
from data.shards import file_sha256, shard_bounds, sidecar, sidecar_path, write_sidecar
from inference import batching, budget
from inference.loading import LoadSpec, ModelError, check_export, resolve_base_model
from inference.submission import (ensemble, resolve_prior, served_probs, softmax, validate_submission,
                                  write_submission)

log = logging.getLogger("arena.predict")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DEGRADED = 0, 1, 2, 3


class InputError(ValueError):
    """Options or devices every worker would fail on, found before any worker starts (exit status 2)."""
FAILED, PENDING = -2, -1  # row states of a phase besides a mode index


@dataclass(frozen=True)
class PredictConfig:
    """One prediction run (the CLI flags)."""

    models: tuple[str, ...]
    test: str
    out: str
    weights: tuple[float, ...] | None = None  # ensemble weights (normalised); default equal
    base_models: tuple[str, ...] = ()  # base-model dirs for adapter exports, one per --model (or one for all)
    devices: str = "auto"
    time_budget: float | None = 8.5 * 3600  # seconds from process start; None: no limit
    max_length: int | None = None  # default: each model's training max_length (arena.json format)
    tta: str | float = "on"  # who gets the swapped view: 'on' all, 'auto' within the budget, 'off', or a fraction
    quantize: str = "none"
    dtype: str = "auto"
    batch_tokens: int | None = None  # padded tokens per forward pass; default 8192 on GPU, 4096 on CPU
    max_batch_rows: int = 64
    checkpoint_every: float = 120.0  # seconds between partial submissions
    depth: int = 2  # batches queued per worker, so a GPU never waits for the next one
    shard: tuple[int, int] | None = None  # (K, N): score only slice K (from 0) of N of the test rows (data/shards.py)
    parallel: str = "data"  # "data": a model copy per device; "pipeline": one model split by layers (pipeline.py)
    micro_batches: int = 4  # pipeline: micro-batches per batch, so both stages work at once
    fallback_quantize: str = "auto"  # pipeline: copies for data-parallel workers if a stage dies (auto: 4bit on
    # GPU, unquantized on the CPU; off: the remaining rows get the prior)

    def __post_init__(self):
        object.__setattr__(self, "tta", budget.parse_tta(self.tta))  # True/False (old callers) mean on/off
        if not self.models:
            raise ValueError("give at least one --model")
        if self.weights is not None:
            if len(self.weights) != len(self.models):
                raise ValueError(f"--weights has {len(self.weights)} values for {len(self.models)} models")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"--weights must be non-negative and not all zero, got {self.weights}")
        if self.base_models and len(self.base_models) not in (1, len(self.models)):
            raise ValueError(f"--base-model: give one, or one per --model ({len(self.models)})")
        if self.max_length is not None and self.max_length < 64:
            raise ValueError(f"--max-length {self.max_length} is too small (at least 64)")
        if self.batch_tokens is not None and self.batch_tokens < 64:
            raise ValueError(f"--batch-tokens {self.batch_tokens} is too small")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise ValueError(f"--shard must be K/N with 0 <= K < N, got {self.shard[0]}/{self.shard[1]}")
        if self.parallel not in ("data", "pipeline"):
            raise ValueError(f"--parallel must be 'data' or 'pipeline', got {self.parallel!r}")
        if self.micro_batches < 1:
            raise ValueError(f"--micro-batches must be at least 1, got {self.micro_batches}")
        if self.fallback_quantize not in ("auto", "4bit", "8bit", "none", "off"):
            raise ValueError(f"--fallback-quantize must be auto, 4bit, 8bit, none or off, "
                             f"got {self.fallback_quantize!r}")


@dataclass
class PredictResult:
    out: Path
    rows: int
    exit_code: int
    messages: list[str]  # what was degraded or lost, one line each (empty: full quality)
    notes: list[str]  # input oddities that did not cost quality (e.g. rows with malformed JSON)
    seconds: float
    probs: np.ndarray
    first_result_seconds: float | None = None  # start-up: from t0 to the first scored batch (None: none came)


@dataclass
class Phase:
    """One model of the ensemble: its tokenized rows, what is pending, and the logits collected so far."""

    k: int
    spec: LoadSpec
    meta: dict
    formatter: object
    pad_id: int
    max_length: int
    cost: batching.CostModel
    turns: list
    full: np.ndarray  # untruncated length per row
    weight: float
    order: list[int] = field(default_factory=list)  # rows longest first
    pos: int = 0
    retry: list[int] = field(default_factory=list)  # rows of lost batches, run again first
    logits: np.ndarray = None
    logits_swap: np.ndarray = None
    state: np.ndarray = None  # PENDING, FAILED, or the index of the mode the row was scored with
    attempts: np.ndarray = None
    view_cap: np.ndarray = None  # max_length of the row's first view (its swap must use the same); 0: none yet
    swap_queue: list[int] | None = None  # phase 2: rows for the swapped view, most uncertain first; None: unplanned
    swap_pos: int = 0  # queue rows admitted so far (the budget check runs chunk by chunk)
    swap_ready: list[int] = field(default_factory=list)  # admitted rows not yet sent, longest first
    swap_retry: list[int] = field(default_factory=list)  # swaps of lost batches, run again once
    swap_lost: set = field(default_factory=set)
    swap_cut: int = 0  # queued swaps dropped because the projected finish would overrun the budget

    def __post_init__(self):
        n = len(self.full)
        self.order = batching.longest_first(self.full)
        self.logits = np.full((n, 3), np.nan)
        self.logits_swap = np.full((n, 3), np.nan)
        self.state = np.full(n, PENDING)
        self.attempts = np.zeros(n, dtype=np.int64)
        self.view_cap = np.zeros(n, dtype=np.int64)

    def pending(self) -> list[int]:
        return self.retry + self.order[self.pos :]

    def has_pending(self) -> bool:
        return bool(self.retry) or self.pos < len(self.order)

    def row_cost(self, rows, mode: budget.Mode) -> np.ndarray:
        lengths = batching.row_lengths(self.full[rows], mode.length(self.max_length))
        return self.cost.flops(lengths)

    def remaining_cost(self, mode: budget.Mode) -> float:
        rows = self.pending()
        return float(self.row_cost(rows, mode).sum()) if rows else 0.0

    def take(self, mode: budget.Mode, batch_tokens: int, max_rows: int) -> list[int]:
        """The next rows to run: the longest pending ones that fit the token budget."""
        if self.retry:
            self.retry.sort(key=lambda i: -self.full[i])
            source = self.retry
        else:
            source = self.order[self.pos : self.pos + max_rows]
        lengths = batching.row_lengths(self.full[source], mode.length(self.max_length))
        n = batching.take_batch(lengths, batch_tokens, max_rows)
        rows = list(source[:n])
        if self.retry:
            del self.retry[:n]
        else:
            self.pos += n
        return rows

    def swap_lengths(self, rows) -> np.ndarray:
        """Rendered length of each row's swapped view: that of its first view."""
        rows = np.asarray(rows, dtype=np.int64)
        return batching.row_lengths(self.full[rows], self.view_cap[rows])

    def plan_swaps(self, tta) -> None:
        """Phase 2's queue: the rows with a first view, highest entropy first, capped as --tta asks."""
        scored = np.flatnonzero(self.state >= 0)
        order = scored[budget.swap_order(self.first_view_probs()[scored])]
        self.swap_queue = [int(i) for i in order[: budget.swap_cap(tta, len(self.full))]]

    def has_swaps(self) -> bool:
        """Swapped views still to send (True while the queue is unplanned: phase 1 decides it)."""
        return (self.swap_queue is None or self.swap_pos < len(self.swap_queue) or bool(self.swap_ready)
                or bool(self.swap_retry))

    def swapped(self) -> np.ndarray:
        """Mask of rows that have both views."""
        return np.all(np.isfinite(self.logits_swap), axis=1) & (self.state >= 0)

    def first_view_probs(self) -> np.ndarray:
        t_tta = float(self.meta.get("temperature") or 1.0)
        return softmax(self.logits, float(self.meta.get("temperature_no_tta") or t_tta))

    def probs(self) -> np.ndarray:
        """(rows, 3) probabilities; NaN where this model has no prediction (see `served_probs`)."""
        return served_probs(self.logits, self.logits_swap, self.meta)


@dataclass
class InFlight:
    phase: int
    rows: list[int]
    mode: int
    worker: int
    cost: float
    swap: bool = False  # phase 2: the rows' A/B-swapped views


# ---------------------------------------------------------------------------------------------------------------
def predict(cfg: PredictConfig, t0: float | None = None) -> PredictResult:
    """Run the whole job. Raises DataError (unreadable test file) and ModelError/ValueError (bad options) before
    any work starts; afterwards every problem is reported in the result and the file stays valid."""
    t0 = time.monotonic() if t0 is None else t0
    deadline = t0 + cfg.time_budget if cfg.time_budget else None
    hard_stop = deadline - budget.reserve_seconds(cfg.time_budget) if deadline else None

    # 1. The test rows; odd rows are kept (predicted from what could be read) and named.
    battles = read_battles(cfg.test, lenient=True)
    total_rows = len(battles)
    if cfg.shard is not None:  # one contiguous slice; the sidecar written at the end lets arena-data merge check
        sidecar_path(cfg.out).unlink(missing_ok=True)
        start, stop = shard_bounds(total_rows, *cfg.shard)
        battles = battles[start:stop]
        if not battles:
            raise InputError(f"--shard {cfg.shard[0]}/{cfg.shard[1]}: no rows ({cfg.test} has {total_rows} rows)")
    ids = [b.id for b in battles]
    messages: list[str] = []
    notes: list[str] = []
    for b in battles:
        for w in b.warnings:
            log.warning("id %s: %s; predicted from what could be read", b.id, w)
    odd = [b.id for b in battles if b.warnings]
    if odd:
        notes.append(f"{len(odd)} odd input rows predicted best-effort (ids {_short(odd)})")

    # 2. A valid file at once (uniform), then the models' prior once their arena.json files are read.
    write_submission(cfg.out, ids, np.full((len(ids), 3), 1.0 / 3.0), np.full(3, 1.0 / 3.0))
    metas = [check_export(m) for m in cfg.models]
    weights = np.asarray(cfg.weights or [1.0] * len(cfg.models), dtype=np.float64)
    weights = weights / weights.sum()
    prior = resolve_prior([m.get("prior") for m in metas], weights)
    write_submission(cfg.out, ids, np.tile(prior, (len(ids), 1)), prior)
    log.info("%d test rows; prior-filled %s written; prior %s", len(ids), cfg.out, np.round(prior, 4).tolist())
    specs = [_load_spec(cfg, k, m, meta) for k, (m, meta) in enumerate(zip(cfg.models, metas))]

    # 3. Workers start loading their models while this process tokenizes.
    from inference.pool import parse_devices

    try:
        devices = parse_devices(cfg.devices)
        _preflight(cfg, devices)
    except ValueError as e:
        raise InputError(str(e)) from None
    batch_tokens = cfg.batch_tokens or (8192 if devices[0].startswith("cuda") else 4096)
    if cfg.parallel == "pipeline":  # every stage holds a batch, and one more waits: no stage starves between batches
        cfg = replace(cfg, depth=max(cfg.depth, len(devices) + 1))
    pool = _make_pool(cfg, devices)
    pool.start()
    log.info("%d worker(s) on %s; batch_tokens %d", len(devices), ",".join(devices), batch_tokens)
    modes = budget.ladder()  # phase 1 (one view per row); the swapped views are phase 2
    phases: list[Phase] = []
    try:
        phases = _tokenize_all(cfg, specs, metas, weights, battles)
        loop = _Loop(cfg, pool, phases, modes, ids, prior, batch_tokens, hard_stop, t0)
        loop.run()
        messages += loop.messages
        for ph in phases:
            line, degraded = _tta_summary(ph, cfg.tta, len(phases))
            log.info("%s", line)
            if degraded:
                messages.append(line)
            elif cfg.tta not in ("on", "off"):  # auto / a fraction: partial coverage by design, said as a note
                notes.append(line)
        if loop.fp32_reruns:
            messages.append(f"{loop.fp32_reruns} sequence(s) overflowed in half precision (non-finite logits) and "
                            "were re-run in fp32 compute: same quality, slower; --dtype fp32 avoids it")
    except BaseException:
        pool.shutdown(wait=0.0)
        _write_current(cfg.out, ids, phases, prior)
        raise
    # workers get up to 10 s to stop cleanly, but never past the hard stop (a run that ends just before it)
    grace = 10.0 if hard_stop is None else min(10.0, max(0.0, hard_stop - time.monotonic()))
    pool.shutdown(wait=0.0 if loop.timed_out else grace)

    # 4. Final file: what every model produced, the prior where nothing did; then check it like Kaggle would.
    probs, fallback = _write_current(cfg.out, ids, phases, prior)
    problems = validate_submission(cfg.out, ids)
    if problems:  # should never happen; a prior-only file is still better than a rejected one
        write_submission(cfg.out, ids, np.tile(prior, (len(ids), 1)), prior)
        messages += ["submission failed its check, wrote the prior for every row:", *problems]
    messages += _describe(phases, modes, ids, fallback)
    code = EXIT_DEGRADED if messages else EXIT_OK
    if loop.ready == 0 and not loop.timed_out and fallback.all():
        # No worker ever loaded a model: the export is broken (an input problem, like a bad path). A prior-only
        # file is valid but worthless; exit 3 would let a notebook's "Save Version" pass with it, exit 2 stops it.
        messages.insert(0, "no worker could load the model(s): every row got the prior; "
                           + "; ".join(sorted(set(loop.errors.values())))[:2000])
        code = EXIT_USAGE
    if cfg.shard is not None and code != EXIT_USAGE:  # a usable shard: merge may take it
        write_sidecar(cfg.out, sidecar(*cfg.shard, total_rows, cfg.test, file_sha256(cfg.test)))
    first = loop.wall[0] - t0 if loop.wall else None
    return PredictResult(Path(cfg.out), len(ids), code, messages, notes, time.monotonic() - t0, probs, first)


def _preflight(cfg: PredictConfig, devices: list[str]) -> None:
    """Fail on options every worker would fail on, before starting them (clear message, exit status 2)."""
    import importlib.util

    from inference.loading import quantization_config, torch_dtype

    for d in set(devices):
        dtype = torch_dtype(cfg.dtype, d)
    if cfg.quantize != "none" and importlib.util.find_spec("bitsandbytes") is None:
        quantization_config(cfg.quantize, dtype)  # raises ImportError naming the pip extra
    if cfg.parallel == "pipeline":
        from inference.modeling import read_meta
        from inference.pipeline import check_pipeline

        for m in cfg.models:
            check_pipeline(m, read_meta(m), len(devices), cfg.quantize)


def _make_pool(cfg: PredictConfig, devices: list[str]):
    """One worker per device (data), or one pipeline group over all devices that looks like one worker."""
    if cfg.parallel == "data":
        from inference.pool import WorkerPool

        return WorkerPool(devices)
    from inference.pipeline import PipelinePool, model_bytes_16bit

    return PipelinePool(devices, cfg.micro_batches, cfg.fallback_quantize,
                        max(model_bytes_16bit(m) for m in cfg.models))


def _load_spec(cfg: PredictConfig, k: int, model_dir: str, meta: dict) -> LoadSpec:
    override = None
    if cfg.base_models:
        override = cfg.base_models[k] if len(cfg.base_models) > 1 else cfg.base_models[0]
    base = resolve_base_model(model_dir, meta, override)
    return LoadSpec(model_dir=str(model_dir), base_model=base, quantize=cfg.quantize, dtype=cfg.dtype)


def _tokenize_all(cfg, specs, metas, weights, battles: list[Battle]) -> list[Phase]:
    """A Phase per model. Models sharing a tokenizer share one tokenization (the slow part on 25k rows)."""
    from data.template import FormatConfig, Formatter
    from data.tokenizer import load_tokenizer

    cache: dict[str, list] = {}
    phases = []
    for k, (spec, meta) in enumerate(zip(specs, metas)):
        t = time.monotonic()
        try:
            tok = load_tokenizer(spec.model_dir)
        except Exception as e:
            raise ModelError(f"{spec.model_dir}: cannot load its tokenizer ({e})") from None
        fmt = FormatConfig.from_dict(meta["format"])
        max_length = cfg.max_length or fmt.max_length
        formatter = Formatter(tok, fmt)
        key = _tokenizer_key(spec.model_dir)
        if key not in cache:
            cache[key] = formatter.tokenize(battles)
        turns = cache[key]
        full = np.array([formatter.full_lengths(t) for t in turns], dtype=np.int64)
        cost = batching.CostModel.from_config_file(Path(spec.base_model or spec.model_dir) / "config.json")
        phases.append(Phase(k, spec, meta, formatter, int(tok.pad_token_id), max_length, cost, turns, full,
                            float(weights[k])))
        log.info("model %d %s: tokenized in %.1fs; lengths median %d, max %d, %d%% over max_length %d",
                 k, spec.model_dir, time.monotonic() - t, np.median(full), full.max(),
                 round(100 * np.mean(full > max_length)), max_length)
    return phases


def _tokenizer_key(model_dir: str) -> str:
    from data.tokenizer import file_digest

    p = Path(model_dir) / "tokenizer.json"
    return file_digest(p) if p.exists() else str(model_dir)


def _current_probs(phases: list[Phase], prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities of every row, mask of rows no model predicted)."""
    if not phases:
        return None, None
    per_model = [ph.probs() for ph in phases]
    probs = ensemble(per_model, [ph.weight for ph in phases], prior)
    nothing = ~np.any(np.stack([np.all(np.isfinite(p), axis=1) for p in per_model]), axis=0)
    return probs, nothing


def _write_current(out, ids, phases: list[Phase], prior: np.ndarray):
    """Write the submission as it stands (atomic). Returns (probabilities, mask of rows that got the prior)."""
    probs, nothing = _current_probs(phases, prior)
    if probs is None:
        probs, nothing = np.tile(prior, (len(ids), 1)), np.ones(len(ids), dtype=bool)
    bad = write_submission(out, ids, probs, prior)
    return probs, nothing | bad


def _describe(phases: list[Phase], modes: list[budget.Mode], ids, fallback: np.ndarray) -> list[str]:
    """One line per kind of degradation (empty when every row got the best treatment)."""
    out = []
    for ph in phases:
        name = f"model {ph.k} ({ph.spec.model_dir})" if len(phases) > 1 else "model"
        for m in range(1, len(modes)):
            n = int(np.sum(ph.state == m))
            if n:
                out.append(f"{name}: {n} rows scored with {modes[m].describe(ph.max_length)} "
                           f"(time budget; best is {modes[0].describe(ph.max_length)})")
        failed = [ids[i] for i in np.flatnonzero(ph.state == FAILED)]
        if failed:
            out.append(f"{name}: {len(failed)} rows could not be scored (ids {_short(failed)})")
        missing = int(np.sum(ph.state == PENDING))
        if missing and len(phases) > 1:
            out.append(f"{name}: {missing} rows not reached (other models' predictions used)")
    prior_ids = [ids[i] for i in np.flatnonzero(fallback)]
    if prior_ids:
        out.append(f"{len(prior_ids)} of {len(ids)} rows got the prior (ids {_short(prior_ids)})")
    return out


def _tta_summary(ph: Phase, tta, n_models: int = 1) -> tuple[str, bool]:
    """`TTA: N of M rows got both views (x%)` and whether that is less than --tta asked for (a degradation).

    on: every row with a first view; FRACTION: ceil(FRACTION x rows) of them; auto: the swaps the budget admitted
    (its partial coverage is planned, not degraded, unless admitted swaps were then lost to the deadline or a
    worker); off: none.
    """
    n, got = len(ph.full), int(ph.swapped().sum())
    scored = int(np.sum(ph.state >= 0))
    if tta == "auto":
        asked = min(ph.swap_pos, scored)
    else:
        asked = min(budget.swap_cap(tta, n), scored)
    name = f"model {ph.k} ({ph.spec.model_dir}): " if n_models > 1 else ""
    line = f"{name}TTA: {got} of {n} rows got both views ({100.0 * got / max(n, 1):.0f}%), --tta {tta}"
    if got < asked:
        why = f"{ph.swap_cut} dropped by the time budget" if ph.swap_cut else "time budget or lost workers"
        line += (f" asked for {asked} ({why}; the most uncertain rows were swapped first, the least useful swaps "
                 "dropped)")
    elif tta == "auto" and ph.swap_cut:
        line += f": the most uncertain first, {ph.swap_cut} more did not fit the time budget"
    return line, got < asked


def _take_in_order(lengths: np.ndarray, batch_tokens: int, max_rows: int) -> int:
    """How many rows from the front make the next batch without reordering them: as many as fit `batch_tokens` padded
    to the longest so far (at least one, at most `max_rows`). Same as batching.take_batch on longest-first lists."""
    if len(lengths) == 0:
        return 0
    n = np.arange(1, len(lengths) + 1)
    fits = np.maximum.accumulate(np.maximum(lengths, 1)) * n <= batch_tokens
    first_miss = int(np.argmin(fits)) if not fits.all() else len(lengths)
    return int(max(1, min(first_miss, max_rows)))


def _short(items, n: int = 10) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items)} in total)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------------------------
class _Loop:
    """The dispatch loop: keep every worker fed with the longest pending rows, collect results, watch the clock."""

    def __init__(self, cfg, pool, phases, modes, ids, prior, batch_tokens, hard_stop, t0):
        self.cfg, self.pool, self.phases, self.modes = cfg, pool, phases, modes
        self.ids, self.prior, self.batch_tokens, self.hard_stop, self.t0 = ids, prior, batch_tokens, hard_stop, t0
        self.mode = 0
        self.inflight: dict[int, InFlight] = {}
        self.next_id = 0
        self.speed = {w.index: budget.Throughput() for w in pool.workers}  # steady-state batches
        self.first = {w.index: budget.Throughput() for w in pool.workers}  # first batch after a load (warm-up)
        self.warm: set[tuple[int, int]] = set()  # (worker, model) pairs past their first batch
        self.load_seconds: list[float] = []
        self.messages: list[str] = []
        self.errors: dict[int, str] = {}
        self.ready = 0  # models loaded by any worker: zero at the end means the export itself is broken
        self.fp32_reruns = 0  # rows (views) whose half-precision logits overflowed and were re-run in fp32
        self.timed_out = False
        self.projection: float | None = None
        self.wall: list[float] = []  # [time of the first result, cost finished since]: throughput with all overheads

    def run(self) -> None:
        last_checkpoint = last_log = time.monotonic()
        while True:
            now = time.monotonic()
            if self.hard_stop is not None and now >= self.hard_stop:
                if self._admitted_work_left():
                    self.timed_out = True
                    self.messages.append(f"time budget reached after {budget.format_duration(now - self.t0)}: "
                                         f"{len(self.inflight)} running batches abandoned, unscored rows use "
                                         "fallbacks")
                else:  # every first view and admitted swap is scored: only swaps never admitted are left
                    self._cut_unadmitted_swaps()
                break
            self._choose_mode(now)
            self._dispatch()
            if not self.inflight and not any(ph.has_pending() or ph.has_swaps() for ph in self.phases):
                break
            if not self.pool.alive():
                self.messages.append("no worker left alive: unscored rows use fallbacks")
                break
            timeout = 0.5 if self.hard_stop is None else min(0.5, max(0.01, self.hard_stop - now))
            msg = self.pool.get(timeout)
            if msg is not None:
                self._handle(msg)
            for w in self.pool.newly_dead():
                self._lost(w)
            now = time.monotonic()
            if now - last_checkpoint >= self.cfg.checkpoint_every:
                _write_current(self.cfg.out, self.ids, self.phases, self.prior)
                last_checkpoint = now
            if now - last_log >= max(10.0, self.cfg.checkpoint_every / 4):
                self._progress(now)
                last_log = now

    def _admitted_work_left(self) -> bool:
        """Work the run committed to that the deadline would cut: batches in flight, first views, admitted swaps."""
        return bool(self.inflight) or any(ph.has_pending() or ph.swap_ready or ph.swap_retry for ph in self.phases)

    def _cut_unadmitted_swaps(self) -> None:
        """The deadline came between two admission checks with nothing running: the queued swaps not yet admitted
        are dropped as the next check would have dropped them (least uncertain, a budget cut, not a loss)."""
        for ph in self.phases:
            if ph.swap_queue is None:
                ph.plan_swaps(self.cfg.tta)
            self._drop_swaps(ph, ph.swap_pos)

    def _drop_swaps(self, ph: Phase, end: int) -> None:
        """Drop the queue from `end` on (its least uncertain swaps): a budget cut, counted and logged once."""
        dropped = len(ph.swap_queue) - end
        if dropped <= 0:
            return
        ph.swap_cut += dropped
        del ph.swap_queue[end:]
        log.warning("%stime budget: %d swapped views admitted, the %d least uncertain of the queue dropped",
                    f"model {ph.k}: " if len(self.phases) > 1 else "", end, dropped)

    # -- decisions -------------------------------------------------------------------------------------------
    def _rate(self) -> float | None:
        alive = len(self.pool.alive())
        # warm-up batches (CUDA context, kernel selection) are slow: use them only until a steady one is measured
        return budget.combined_rate(list(self.speed.values()), alive) or \
            budget.combined_rate(list(self.first.values()), alive)

    def _load_seconds_ahead(self, after: int = 0) -> float:
        """Known model loads still ahead for models after `after` (each as slow as the slowest load seen)."""
        future_loads = sum(1 for ph in self.phases[after + 1:] if ph.has_pending() and not any(
            w.loaded is not None and w.loaded >= ph.k for w in self.pool.alive()))
        return future_loads * (max(self.load_seconds) if self.load_seconds else 0.0)

    def _choose_mode(self, now: float) -> None:
        """Phase 1's mode: the least shortened max_length whose first views all fit (swaps are not reserved)."""
        if self.hard_stop is None or not any(ph.has_pending() for ph in self.phases):
            return
        rate = self._rate()
        inflight = sum(b.cost for b in self.inflight.values())
        extra = self._load_seconds_ahead()
        cost = lambda mode: inflight + sum(ph.remaining_cost(mode) for ph in self.phases)  # noqa: E731
        new, self.projection = budget.choose_mode(self.modes, self.mode, cost, rate, self.hard_stop - now, extra)
        if new != self.mode:
            proj = "does not fit even then" if self.projection is None or self.projection > self.hard_stop - now \
                else f"projected {budget.format_duration(self.projection)}"
            msg = (f"time budget: {budget.format_duration(self.hard_stop - now)} left at "
                   f"{budget.format_duration(now - self.t0)}; remaining rows switched to {self.modes[new].describe()} "
                   f"({proj})")
            log.warning("%s", msg)
            self.messages.append(msg)
            self.mode = new

    def _dispatch(self) -> None:
        for w in sorted(self.pool.alive(), key=lambda w: len(w.outstanding)):
            while len(w.outstanding) < self.cfg.depth:
                work = self._next_work()
                if work is None:
                    return
                ph, swap = work
                if w.loaded != ph.k:
                    self.pool.send(w, ("load", ph.k, asdict(ph.spec)))
                    w.loaded = ph.k
                if swap:
                    self._send_swaps(w, ph)
                else:
                    self._send_batch(w, ph)

    def _next_work(self) -> tuple[Phase, bool] | None:
        """(model, is phase 2) of the next batch, or None (nothing to send now): model by model, every row's first
        view, then its swapped views, most uncertain first."""
        for ph in self.phases:
            if ph.has_pending():
                return ph, False
            if any(b.phase == ph.k and not b.swap for b in self.inflight.values()):
                return None  # the swap order needs every first view of this model
            if ph.swap_queue is None:
                ph.plan_swaps(self.cfg.tta)
            if ph.swap_retry or ph.swap_ready or self._admit_swaps(ph):
                return ph, True
        return None

    def _admit_swaps(self, ph: Phase) -> bool:
        """Move the next chunk of the queue (most uncertain first) to the send list, as far as the projected finish
        allows; a chunk that does not fit is cut where it stops fitting and the rest of the queue dropped. Every
        chunk (about 4 batches per worker) is sent in entropy order, so that if the deadline still comes first (a
        machine slower than projected), the swaps it abandons are the least uncertain ones; the price is some
        padding (a batch pads to its longest row)."""
        rest = ph.swap_queue[ph.swap_pos:]
        if not rest:
            return False
        lengths = ph.swap_lengths(rest)
        window = int(np.searchsorted(np.cumsum(lengths), 4 * self.batch_tokens * max(1, len(self.pool.alive())))) + 1
        take = min(window, len(rest))
        allowed = self._swap_allowance(ph)
        if allowed is not None:
            fit = int(np.searchsorted(np.cumsum(ph.cost.flops(lengths[:take])), allowed, side="right"))
            if fit < take:
                take = fit
                self._drop_swaps(ph, ph.swap_pos + fit)
        ph.swap_ready = list(rest[:take])
        ph.swap_pos += take
        return take > 0

    def _batch_seconds(self) -> float:
        """Mean compute seconds of a steady batch (warm-up batches until one is measured; 0 before any)."""
        for speeds in (self.speed, self.first):
            done = [t for t in speeds.values() if t.batches]
            if done:
                return sum(t.seconds for t in done) / sum(t.batches for t in done)
        return 0.0

    def _swap_allowance(self, ph: Phase) -> float | None:
        """Cost units of swaps that still fit: the time left x the measured rate, less the work in flight and the
        first views the later models still need (and their loads). None: no budget, or nothing measured yet."""
        rate = self._rate()
        if self.hard_stop is None or rate is None:
            return None
        now = time.monotonic()
        if len(self.wall) == 2 and self.wall[1] > 0 and now > self.wall[0]:
            # swaps are optional work admitted up to the deadline: trust the wall-clock rate (dispatch, transfers,
            # a busy host) where it is lower than the workers' own compute rate
            rate = min(rate, self.wall[1] / (now - self.wall[0]))
        later = sum(q.remaining_cost(self.modes[self.mode]) for q in self.phases[ph.k + 1:])
        inflight = sum(b.cost for b in self.inflight.values())
        seconds = self.hard_stop - now - self._load_seconds_ahead(ph.k)
        # slack so that admitted swaps end before the deadline rather than on it (a batch still running then is
        # abandoned, its GPU time lost): the batches each worker keeps queued, or 1% of the time left
        seconds -= max(self.cfg.depth * self._batch_seconds(), 0.01 * seconds)
        return max(0.0, seconds * rate - inflight - later)

    def _send_swaps(self, w, ph: Phase) -> None:
        """A phase-2 batch: swapped views at each row's first-view max_length (exactly symmetric TTA)."""
        source = ph.swap_retry if ph.swap_retry else ph.swap_ready
        if source is ph.swap_retry:
            source.sort(key=lambda i: -ph.full[i])
        n = _take_in_order(ph.swap_lengths(source), self.batch_tokens, self.cfg.max_batch_rows)
        rows = source[:n]
        del source[:n]
        seqs, kept = [], []
        for i in rows:
            try:
                seqs.append(np.asarray(ph.formatter.render(ph.turns[i], True, int(ph.view_cap[i])), dtype=np.int32))
                kept.append(i)
            except Exception as e:  # the row keeps its first view
                log.warning("id %s: cannot render the swapped view (%s); it keeps one view", self.ids[i], e)
        if not kept:
            return
        bid = self.next_id
        self.next_id += 1
        cost = float(ph.cost.flops(ph.swap_lengths(kept)).sum())
        self.inflight[bid] = InFlight(ph.k, kept, self.mode, w.index, cost, swap=True)
        w.outstanding.append(bid)
        self.pool.send(w, ("batch", bid, ph.k, seqs, ph.pad_id))

    def _send_batch(self, w, ph: Phase) -> None:
        mode = self.modes[self.mode]
        rows = ph.take(mode, self.batch_tokens, self.cfg.max_batch_rows)
        length = mode.length(ph.max_length)
        seqs, kept = [], []
        for i in rows:
            try:
                seqs.append(np.asarray(ph.formatter.render(ph.turns[i], False, length), dtype=np.int32))
                kept.append(i)
            except Exception as e:  # one odd row must not stop the run
                log.warning("id %s: cannot render (%s); it gets a fallback", self.ids[i], e)
                ph.state[i] = FAILED
        if not kept:
            return
        bid = self.next_id
        self.next_id += 1
        self.inflight[bid] = InFlight(ph.k, kept, self.mode, w.index, float(ph.row_cost(kept, mode).sum()))
        w.outstanding.append(bid)
        self.pool.send(w, ("batch", bid, ph.k, seqs, ph.pad_id))

    # -- events ----------------------------------------------------------------------------------------------
    def _handle(self, msg) -> None:
        kind, index = msg[0], msg[1]
        w = self.pool.workers[index]
        if kind == "ready":
            self.ready += 1
            self.load_seconds.append(msg[3])
            log.info("worker %d (%s) loaded model %d in %.1fs", index, w.device, msg[2], msg[3])
        elif kind == "error":
            self.errors[index] = msg[2]
            log.error("%s", msg[2])
        elif kind == "result":
            _, _, bid, logits, seconds, ooms, reruns = msg
            b = self.inflight.pop(bid, None)
            if bid in w.outstanding:
                w.outstanding.remove(bid)
            w.batches_done += 1
            if b is None:
                return  # answered after its worker was given up on: already re-queued
            if ooms:
                log.warning("worker %d: out of memory %d time(s); batch halved and retried", index, ooms)
            if reruns:
                self.fp32_reruns += reruns
                log.warning("worker %d: %d sequence(s) gave non-finite fp16 logits (overflow); re-run in fp32 "
                            "(%d so far)", index, reruns, self.fp32_reruns)
            self._store(b, logits)
            if self.wall:
                self.wall[1] += b.cost
            else:
                self.wall = [time.monotonic(), 0.0]
            speeds = self.speed if (index, b.phase) in self.warm else self.first
            speeds.setdefault(index, budget.Throughput()).add(b.cost, seconds)  # fallback workers join late
            self.warm.add((index, b.phase))

    def _store(self, b: InFlight, logits: np.ndarray) -> None:
        ph = self.phases[b.phase]
        n = len(b.rows)
        rows = np.asarray(b.rows)
        if b.swap:
            ph.logits_swap[rows] = logits[:n]  # non-finite ones are ignored by probs(): the row keeps one view
            return
        ph.logits[rows] = logits[:n]
        ok = np.all(np.isfinite(logits[:n]), axis=1)
        ph.state[rows] = np.where(ok, b.mode, FAILED)
        ph.view_cap[rows] = self.modes[b.mode].length(ph.max_length)

    def _lost(self, w) -> None:
        """A worker died: re-queue its batches once (a row that kills two workers gets a fallback)."""
        rows_back, given_up = 0, []
        for bid in list(w.outstanding):
            b = self.inflight.pop(bid, None)
            if b is None:
                continue
            ph = self.phases[b.phase]
            if b.swap:  # once more; a swap lost twice leaves the row with its first view
                again = [i for i in b.rows if i not in ph.swap_lost]
                ph.swap_lost.update(b.rows)
                if self.pool.alive():
                    ph.swap_retry += again
                    rows_back += len(again)
                continue
            for i in b.rows:
                ph.attempts[i] += 1
                if ph.attempts[i] < 2 and len(self.pool.alive()) > 0:
                    ph.retry.append(i)
                    rows_back += 1
                else:
                    ph.state[i] = FAILED
                    given_up.append(self.ids[i])
        w.outstanding.clear()
        why = self.errors.get(w.index, "").strip().splitlines()
        reason = f"; last error: {why[-1]}" if why else ""
        msg = (f"worker {w.index} ({w.device}) died (exit code {w.process.exitcode}) after {w.batches_done} "
               f"batches{reason}; {rows_back} of its rows re-queued on the other workers")
        if given_up:
            msg += f"; {len(given_up)} rows lost (ids {_short(given_up)})"
        if w.note:
            msg += f"; {w.note}"
        if not self.pool.alive():
            msg += "; no worker is left"
        log.error("%s", msg)
        self.messages.append(msg)

    def _progress(self, now: float) -> None:
        done = sum(int(np.sum(ph.state >= 0)) for ph in self.phases)
        swapped = sum(int(ph.swapped().sum()) for ph in self.phases)
        total = sum(len(ph.full) for ph in self.phases)
        proj = f", projected {budget.format_duration(self.projection)} more" if self.projection else ""
        log.info("%s: %d/%d rows scored, %d with the swapped view too; first views at %s%s",
                 budget.format_duration(now - self.t0), done, total, swapped, self.modes[self.mode].describe(), proj)
