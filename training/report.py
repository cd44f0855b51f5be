"""End-of-training run report and temperature scaling.

Why: a log-loss competition rewards calibration as much as ranking, and a fine-tuned LLM classifier is usually
over-confident after a few epochs. The report shows at a glance whether training converged (loss curves against the
uniform and class-prior baselines), whether the probabilities can be trusted (reliability diagram, ECE), and where
the errors are (confusion matrix, mostly ties). One scalar temperature fitted on the validation fold fixes most of
the over-confidence without changing accuracy (Guo et al. 2017, "On Calibration of Modern Neural Networks"); it is
saved in the export's arena.json and inference divides the logits by it.

Inputs, written by rank 0 of the training loop into the run directory:
  metrics.jsonl         one JSON object per logged step: {"step", "loss", "lr"?} and evaluation entries with
                        {"step", "val_logloss", "val_accuracy"?}
  val_predictions.npz   arrays probs (N, 3), labels (N,), logits (N, 3) of the validation fold (optional)
Outputs under run_dir/report/: loss.png, calibration.png, confusion.png, report.md (all written atomically).
Called by rank 0 only at the end of training; `python -m training.report RUN_DIR` regenerates it afterwards.

The numbers are pure NumPy functions (tested on their own); matplotlib is imported inside write_report only.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.atomic import atomic_path, write_atomic
from data.scoring import log_loss
from inference.submission import softmax, tta_average

CLASS_NAMES = ("A", "B", "tie")
UNIFORM_LOGLOSS = math.log(3)  # 1.0986: the score of predicting 1/3 everywhere
# Temperatures outside this range mean a broken model, not a calibration problem; the bound keeps a separable
# validation set (optimum at T -> 0) from returning an absurd value.
T_MIN, T_MAX = 0.05, 20.0


# ----------------------------------------------------------------------------------------------------------------
# Pure numbers




def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits / T), computed with log-sum-exp (no clipping needed)."""
    z = logits / temperature
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))


def _numpy(x) -> np.ndarray:
    """Accept torch tensors too (any dtype or device: bf16 has no NumPy equivalent, hence the float cast)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def _tta_nll(logits: np.ndarray, logits_swap: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Log loss of the A/B-swap TTA average of softmax(logits / T) and the swapped view mapped back."""
    p = tta_average(softmax(logits, temperature), softmax(logits_swap, temperature))
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-300, None))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tol: float = 1e-5, logits_swap=None) -> float:
    """The temperature T in [T_MIN, T_MAX] minimising the log loss of softmax(logits / T) on (logits, labels).

    With `logits_swap` (the logits of the A/B-swapped inputs, in swapped class order) the loss is that of the TTA
    average inference serves: averaging two views already softens the probabilities, so its T is smaller.

    The NLL is convex in 1/T (log-sum-exp of a linear function minus a linear function), hence unimodal in log T,
    so a golden-section search on log T finds the bounded optimum without gradients or a learning rate.
    Returns 1.0 for degenerate input (no rows, non-finite logits, logits constant in every row) and whenever the
    fit is no better than T = 1. Raises ValueError for mismatched shapes or labels outside 0..2.
    """
    z, y = _numpy(logits).astype(np.float64), _numpy(labels).astype(np.int64)
    if z.ndim != 2 or z.shape[1] != 3 or y.shape != (len(z),):
        raise ValueError(f"expected logits of shape (n, 3) and n labels, got {z.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() > 2):
        raise ValueError(f"labels must be 0 (A), 1 (B) or 2 (tie), got values in [{y.min()}, {y.max()}]")
    if len(y) == 0 or not np.isfinite(z).all() or np.ptp(z, axis=1).max() == 0:
        return 1.0
    if logits_swap is None:
        nll = lambda t: _nll(z, y, t)  # noqa: E731
    else:
        zs = _numpy(logits_swap).astype(np.float64)
        if zs.shape != z.shape or not np.isfinite(zs).all():
            raise ValueError(f"logits_swap must be finite with the shape of logits {z.shape}, got {zs.shape}")
        nll = lambda t: _tta_nll(z, zs, y, t)  # noqa: E731
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    inv_phi = (math.sqrt(5) - 1) / 2
    a, b = lo + (1 - inv_phi) * (hi - lo), lo + inv_phi * (hi - lo)
    fa, fb = nll(math.exp(a)), nll(math.exp(b))
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - inv_phi) * (hi - lo)
            fa = nll(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + inv_phi * (hi - lo)
            fb = nll(math.exp(b))
    t = math.exp((lo + hi) / 2)
    return float(t) if nll(t) < nll(1.0) else 1.0


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins: edges (n_bins + 1,), and per bin count, mean confidence and hit rate.

    Empty bins have count 0 and NaN confidence / accuracy (they are not plotted and weigh 0 in the ECE).
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> ReliabilityBins:
    """Bin predictions by confidence in [0, 1] and measure how often each bin was right.

    `correct` is 0/1 per prediction (top-label: argmax == label; class-wise: label == k with confidence p_k).
    Bins are (lo, hi], the first one also takes exactly 0.
    """
    c = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if c.shape != hit.shape or c.ndim != 1:
        raise ValueError(f"confidence and correct must be 1-D of the same length, got {c.shape} and {hit.shape}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, c, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=c, minlength=n_bins) / count
        acc = np.bincount(idx, weights=hit, minlength=n_bins) / count
    return ReliabilityBins(edges, count, conf, acc)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (bin share) * |accuracy - mean confidence|."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if len(y) == 0:
        return float("nan")
    bins = reliability_bins(p.max(axis=1), (p.argmax(axis=1) == y), n_bins)
    full = bins.count > 0
    gap = np.abs(bins.accuracy[full] - bins.confidence[full])
    return float(np.sum(bins.count[full] * gap) / len(y))


def confusion_matrix(probs: np.ndarray, labels: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Counts (n_classes, n_classes): rows are true labels, columns the argmax predictions."""
    pred = np.asarray(probs).argmax(axis=1)
    y = np.asarray(labels).astype(np.int64)
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def row_shares(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (recall per true class on the diagonal); rows without examples stay 0."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)


def prior_log_loss(labels: np.ndarray, n_classes: int = 3) -> float:
    """Log loss of always predicting the label frequencies of `labels` (the best constant prediction)."""
    y = np.asarray(labels).astype(np.int64)
    if len(y) == 0:
        return float("nan")
    freq = np.bincount(y, minlength=n_classes) / len(y)
    return log_loss(np.tile(freq, (len(y), 1)), y)


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction, so the first points are not pulled towards 0."""
    v = np.asarray(values, dtype=np.float64)
    out = np.empty_like(v)
    avg = 0.0
    for i, x in enumerate(v):
        avg = weight * avg + (1 - weight) * x
        out[i] = avg / (1 - weight ** (i + 1))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reading the run directory


@dataclass(frozen=True)
class Curves:
    """Training and validation series, sorted by step; each step once (the last logged value wins)."""

    train_step: np.ndarray
    train_loss: np.ndarray
    lr_step: np.ndarray
    lr: np.ndarray
    val_step: np.ndarray
    val_logloss: np.ndarray
    val_accuracy: dict[int, float]


def read_metrics(path: str | Path) -> Curves:
    """Parse metrics.jsonl. A resumed run logs some steps twice: the later entry wins.

    A missing file gives empty curves. Raises ValueError naming file and line for malformed lines.
    """
    series: dict[str, dict[int, float]] = {"loss": {}, "lr": {}, "val_logloss": {}, "val_accuracy": {}}
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            step = int(entry["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: not a JSON object with an integer 'step' ({e})") from None
        for key, values in series.items():
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                values[step] = float(value)

    def arrays(key: str) -> tuple[np.ndarray, np.ndarray]:
        steps = sorted(series[key])
        return np.array(steps, dtype=np.int64), np.array([series[key][s] for s in steps], dtype=np.float64)

    (ts, tl), (ls, lr), (vs, vl) = arrays("loss"), arrays("lr"), arrays("val_logloss")
    return Curves(ts, tl, ls, lr, vs, vl, dict(series["val_accuracy"]))


@dataclass(frozen=True)
class Predictions:
    probs: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    logits_swap: np.ndarray | None = None  # the A/B-swapped view (mapped back), when evaluation scored it

    def served(self, temperature: float = 1.0) -> np.ndarray:
        """What arena-predict serves at this temperature: the A/B-swap average when both views exist."""
        if self.logits_swap is None:
            return softmax(self.logits, temperature)
        return tta_average(softmax(self.logits, temperature), softmax(self.logits_swap, temperature))


def read_predictions(path: str | Path) -> Predictions | None:
    """Load val_predictions.npz (None when absent). Logits default to log(probs), which scales the same way.

    Raises ValueError naming the file when arrays are missing or have inconsistent shapes.
    """
    path = Path(path)
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if "labels" not in arrays or ("probs" not in arrays and "logits" not in arrays):
        raise ValueError(f"{path}: needs arrays 'labels' and 'probs' or 'logits', has {sorted(arrays)}")
    labels = arrays["labels"].astype(np.int64).reshape(-1)
    logits = arrays.get("logits")
    probs = arrays["probs"].astype(np.float64) if "probs" in arrays else softmax(logits)
    if logits is None:
        logits = np.log(np.clip(probs, np.finfo(np.float64).tiny, None))
    logits = logits.astype(np.float64)
    if probs.shape != (len(labels), 3) or logits.shape != probs.shape:
        raise ValueError(f"{path}: probs {probs.shape} / logits {logits.shape} do not match {len(labels)} labels x 3")
    if len(labels) and (labels.min() < 0 or labels.max() > 2):
        raise ValueError(f"{path}: labels must be 0, 1 or 2, got values in [{labels.min()}, {labels.max()}]")
    swap = arrays.get("logits_swap")
    if swap is not None:
        swap = swap.astype(np.float64)
        if swap.shape != logits.shape:
            raise ValueError(f"{path}: logits_swap {swap.shape} does not match logits {logits.shape}")
    return Predictions(probs, labels, logits, swap)


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def summarize(curves: Curves, preds: Predictions | None, temperature: float | None = None,
              temperature_no_tta: float | None = None) -> dict:
    """The report's numbers. Every before/after pair compares the same predictions: the headline is what
    arena-predict serves (the A/B-swap average divided by `temperature`), a single view (--no-tta, with
    `temperature_no_tta`) is the secondary row. Temperatures not given are fitted on the validation predictions."""
    s: dict = {"steps": int(max([*curves.train_step, *curves.val_step], default=0)), "uniform_logloss": UNIFORM_LOGLOSS}
    if len(curves.train_loss):
        s["train_loss_final"] = float(curves.train_loss[-1])
        s["train_loss_final_smoothed"] = float(smooth(curves.train_loss)[-1])
    if len(curves.val_logloss):
        best = int(np.argmin(curves.val_logloss))
        s["val_logloss_final"] = float(curves.val_logloss[-1])
        s["val_logloss_best"] = float(curves.val_logloss[best])
        s["val_logloss_best_step"] = int(curves.val_step[best])
        s["evaluations"] = len(curves.val_logloss)
    if curves.val_accuracy:
        s["val_accuracy_final"] = curves.val_accuracy[max(curves.val_accuracy)]
    if preds is None or len(preds.labels) == 0:
        return s
    y = preds.labels
    t_one = fit_temperature(preds.logits, y) if temperature_no_tta is None else float(temperature_no_tta)
    if temperature is not None:
        t = float(temperature)
    elif preds.logits_swap is not None:
        t = fit_temperature(preds.logits, y, logits_swap=preds.logits_swap)
    else:
        t = t_one
    raw, served = preds.served(1.0), preds.served(t)
    single_raw, single = softmax(preds.logits), softmax(preds.logits, t_one)
    s.update(
        val_rows=len(y),
        tta=preds.logits_swap is not None,
        # the served predictor (A/B-swap average when evaluated with both views): before and after its temperature
        temperature=t,
        val_logloss=log_loss(raw, y),
        val_logloss_scaled=log_loss(served, y),
        served_logloss=log_loss(served, y),
        val_accuracy=float(np.mean(served.argmax(axis=1) == y)),
        ece=expected_calibration_error(raw, y),
        ece_scaled=expected_calibration_error(served, y),
        # one view (arena-predict --no-tta): before and after its own temperature
        temperature_no_tta=t_one,
        single_logloss=log_loss(single_raw, y),
        single_logloss_scaled=log_loss(single, y),
        single_ece=expected_calibration_error(single_raw, y),
        single_ece_scaled=expected_calibration_error(single, y),
        prior_logloss=prior_log_loss(y),
        label_shares=[float(x) for x in np.bincount(y, minlength=3) / len(y)],
    )
    return s


def write_report(run_dir: str | Path, temperature: float | None = None, temperature_no_tta: float | None = None) -> dict:
    """Write run_dir/report/{loss,calibration,confusion}.png, report.md and summary.json; return the summary.

    `temperature` / `temperature_no_tta`: the ones saved with the export (A/B-swap average / single view); when None
    they are fitted here on the validation predictions. Plots that need evaluation data are skipped, and report.md
    says so.
    Raises ValueError for malformed metrics.jsonl / val_predictions.npz; ImportError naming the extra without matplotlib.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the run report needs matplotlib: pip install 'arena-pref[train]'") from e
    matplotlib.use("Agg", force=True)  # no display on training nodes; must come before pyplot is imported

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    curves = read_metrics(run_dir / "metrics.jsonl")
    preds = read_predictions(run_dir / "val_predictions.npz")
    summary = summarize(curves, preds, temperature, temperature_no_tta)

    figures = {}
    if len(curves.train_loss) or len(curves.val_logloss):
        _save_figure(_loss_figure(curves, summary), out / "loss.png")
        figures["loss"] = "loss.png"
    if preds is not None and len(preds.labels):
        _save_figure(_calibration_figure(preds, summary), out / "calibration.png")
        _save_figure(_confusion_figure(preds, summary["temperature"]), out / "confusion.png")
        figures.update(calibration="calibration.png", confusion="confusion.png")
    # Drop plots left over from an earlier report of the same directory that this run could not draw.
    for name in ("loss.png", "calibration.png", "confusion.png"):
        if name not in figures.values() and (out / name).exists():
            (out / name).unlink()
    summary["figures"] = {k: str(out / v) for k, v in figures.items()}
    text = _markdown(run_dir, summary, figures)
    write_atomic(out / "report.md", text)
    summary["report"] = str(out / "report.md")
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Figures (matplotlib is imported by write_report before these run)


def _loss_figure(curves: Curves, s: dict):
    import matplotlib.pyplot as plt

    has_lr = len(curves.lr) > 0
    fig, axes = plt.subplots(
        2 if has_lr else 1, 1, figsize=(8, 6.2 if has_lr else 4.6), sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]} if has_lr else None,
    )
    ax = axes[0, 0]
    if len(curves.train_loss):
        ax.plot(curves.train_step, curves.train_loss, color="tab:blue", alpha=0.25, lw=0.8, label="train loss (raw)")
        ax.plot(curves.train_step, smooth(curves.train_loss), color="tab:blue", lw=1.8, label="train loss (EMA 0.9)")
    if len(curves.val_logloss):
        ax.plot(curves.val_step, curves.val_logloss, "o-", color="tab:orange", lw=1.8, ms=4, label="val log loss",
                zorder=3)
        best = s["val_logloss_best_step"]
        at_end = best == curves.val_step[-1] and len(curves.val_step) > 1
        ax.annotate(f"best {s['val_logloss_best']:.4f}", (best, s["val_logloss_best"]), textcoords="offset points",
                    xytext=(0, 8), ha="right" if at_end else "center", fontsize=8, color="tab:orange", zorder=4,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "tab:orange", "alpha": 0.9})
    ax.axhline(UNIFORM_LOGLOSS, color="gray", ls="--", lw=1, label=f"uniform 1/3 ({UNIFORM_LOGLOSS:.4f})")
    if "prior_logloss" in s:
        ax.axhline(s["prior_logloss"], color="tab:green", ls=":", lw=1.2, label=f"class prior ({s['prior_logloss']:.4f})")
    ax.set_ylabel("log loss (nats)")
    ax.set_title(f"Training: {s['steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    # Early steps of a fresh head can be far above ln 3 and would flatten the interesting part of the curve:
    # the y-axis stops at 2.5 x the larger of ln 3 and the worst validation loss.
    visible = [*curves.val_logloss, UNIFORM_LOGLOSS, *smooth(curves.train_loss)]
    top = min(max(visible) + 0.1, 2.5 * max([UNIFORM_LOGLOSS, *curves.val_logloss]))
    ax.set_ylim(max(0.0, min(visible) - 0.1), top)
    if max(visible) > top:
        ax.text(0.01, 0.98, "y-axis clipped: early loss is higher", transform=ax.transAxes, fontsize=7, va="top", color="gray",
                bbox={"fc": "white", "ec": "none", "alpha": 0.8})
    if has_lr:
        axes[1, 0].plot(curves.lr_step, curves.lr, color="tab:purple", lw=1.2)
        axes[1, 0].set_ylabel("learning rate")
        axes[1, 0].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def _reliability_panel(ax, bar_ax, probs, labels, label, color, offset):
    bins = reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == labels)
    full = bins.count > 0
    ax.plot(bins.confidence[full], bins.accuracy[full], "o-", color=color, lw=1.6, ms=4,
            label=f"{label}: ECE (15 bins) {expected_calibration_error(probs, labels):.3f}")
    width = (bins.edges[1] - bins.edges[0]) * 0.45
    centers = (bins.edges[:-1] + bins.edges[1:]) / 2
    bars = bar_ax.bar(centers + offset * width, bins.count, width=width, color=color, alpha=0.7, label=label)
    bar_ax.bar_label(bars, labels=[str(c) if c else "" for c in bins.count], fontsize=6, padding=1)


def _calibration_figure(preds: Predictions, s: dict):
    import matplotlib.pyplot as plt

    t = s["temperature"]
    what = "A/B-swap average" if preds.logits_swap is not None else "single view"
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.6), gridspec_kw={"height_ratios": [3, 1]})
    ax, bar_ax = axes[0, 0], axes[1, 0]
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="perfect calibration")
    # the served predictions, as in the table: before and after their temperature
    _reliability_panel(ax, bar_ax, preds.served(1.0), preds.labels, "T = 1", "tab:blue", -0.5 if t != 1.0 else 0.0)
    if t != 1.0:
        _reliability_panel(ax, bar_ax, preds.served(t), preds.labels, f"T = {t:.3f}", "tab:red", 0.5)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean top-class confidence in bin", ylabel="accuracy in bin",
           title=f"Top-class reliability (10 bins), served {what}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    bar_ax.set(xlim=(0, 1), xlabel="top-class confidence", ylabel="rows")
    bar_ax.set_ylim(0, bar_ax.get_ylim()[1] * 1.2)  # room for the count labels above the bars
    bar_ax.legend(fontsize=7, loc="upper left")

    # Class-wise: is P(tie) = 0.3 right 30% of the time? Ties are where LLM judges are most miscalibrated.
    ax, bar_ax = axes[0, 1], axes[1, 1]
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1)
    scaled = preds.served(t)
    colors = ("tab:blue", "tab:orange", "tab:green")
    for k, (name, color) in enumerate(zip(CLASS_NAMES, colors)):
        bins = reliability_bins(scaled[:, k], preds.labels == k)
        full = bins.count > 0
        ax.plot(bins.confidence[full], bins.accuracy[full], "o-", color=color, lw=1.4, ms=3, label=f"P({name})")
        centers = (bins.edges[:-1] + bins.edges[1:]) / 2
        bar_ax.bar(centers + (k - 1) * 0.03, bins.count, width=0.03, color=color, alpha=0.7)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability in bin", ylabel="observed frequency",
           title=f"Class-wise reliability at T = {t:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    bar_ax.set(xlim=(0, 1), xlabel="predicted probability", ylabel="rows")
    fig.suptitle(f"Calibration on {len(preds.labels)} validation rows", fontsize=11)
    fig.tight_layout()
    return fig


def _confusion_figure(preds: Predictions, temperature: float = 1.0):
    import matplotlib.pyplot as plt

    counts = confusion_matrix(preds.served(temperature), preds.labels)
    shares = row_shares(counts)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(3):
        for j in range(3):
            ax.text(j, i, f"{counts[i, j]}\n{shares[i, j]:.1%}", ha="center", va="center", fontsize=10,
                    color="white" if shares[i, j] > 0.6 else "black")
    ticks = [f"{n} wins" if n != "tie" else n for n in CLASS_NAMES]
    ax.set_xticks(range(3), ticks)
    ax.set_yticks(range(3), [f"{t}\n(n={n})" for t, n in zip(ticks, counts.sum(axis=1))])
    ax.set(xlabel="predicted (argmax)", ylabel="true label")
    acc = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"Confusion matrix, accuracy {acc:.1%}\n(count and share of the true class's row)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="row share")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _markdown(run_dir: Path, s: dict, figures: dict[str, str]) -> str:
    lines = [f"# Run report: {run_dir.name}", ""]
    rows = [("optimizer steps", str(s["steps"]))]
    if "train_loss_final" in s:
        rows.append(("final train loss (raw / EMA)", f"{_fmt(s['train_loss_final'])} / {_fmt(s['train_loss_final_smoothed'])}"))
    if "val_logloss_final" in s:
        rows += [
            ("evaluations", str(s["evaluations"])),
            ("final val log loss", _fmt(s["val_logloss_final"])),
            ("best val log loss (step)", f"{_fmt(s['val_logloss_best'])} ({s['val_logloss_best_step']})"),
        ]
    if "val_accuracy_final" in s:
        rows.append(("final val accuracy (logged)", _fmt(s["val_accuracy_final"])))
    if "val_rows" in s:
        what = "A/B-swap average" if s["tta"] else "single view"
        t, t1 = s["temperature"], s["temperature_no_tta"]
        rows += [
            ("validation rows", str(s["val_rows"])),
            (f"**val log loss served by arena-predict** ({what}, T = {t:.3f})", f"**{_fmt(s['served_logloss'])}**"),
            (f"the same predictions before T (T = 1)", _fmt(s["val_logloss"])),
            (f"ECE (15 bins) served, T = {t:.3f} / T = 1", f"{_fmt(s['ece_scaled'])} / {_fmt(s['ece'])}"),
            ("val accuracy (served)", _fmt(s["val_accuracy"])),
        ]
        if s["tta"]:
            rows += [(f"single view (--no-tta): log loss T = {t1:.3f} / T = 1",
                      f"{_fmt(s['single_logloss_scaled'])} / {_fmt(s['single_logloss'])}"),
                     (f"single view: ECE T = {t1:.3f} / T = 1",
                      f"{_fmt(s['single_ece_scaled'])} / {_fmt(s['single_ece'])}")]
        rows += [
            ("class-prior log loss", _fmt(s["prior_logloss"])),
            ("label shares A / B / tie", " / ".join(f"{x:.3f}" for x in s["label_shares"])),
        ]
    rows.append(("uniform log loss (ln 3)", _fmt(UNIFORM_LOGLOSS)))
    lines += ["| quantity | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]
    if "val_logloss_final" not in s:
        lines += ["No evaluation entries (`val_logloss`) in metrics.jsonl: the run was not evaluated, so only the "
                  "training loss is shown.", ""]
    if "val_rows" not in s:
        lines += ["No val_predictions.npz: calibration, temperature scaling and the confusion matrix were skipped.", ""]
    else:
        note = "the saved export divides logits by T at inference" if s["temperature"] != 1.0 else \
            "T = 1: scaling did not lower the validation log loss, so inference leaves logits unchanged"
        lines += [f"Temperature fitted on the validation fold ({note}). It is fitted on the same rows it is scored on, "
                  "so the after-T numbers are optimistic by a little. The headline is what `arena-predict` returns "
                  "for these rows (`arena-data score` of its output gives the same number); each before/after pair "
                  "compares the same predictions, and the figures show the served ones.", ""]
    if not figures:
        lines += ["No metrics were logged: no plots.", ""]
    titles = {"loss": "Loss curves", "calibration": "Calibration (reliability diagram)", "confusion": "Confusion matrix"}
    for key, name in figures.items():
        lines += [f"## {titles[key]}", "", f"![{titles[key]}]({name})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Regenerate the report of a finished run: python -m training.report RUN_DIR [--temperature T]."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.report", description=main.__doc__)
    parser.add_argument("run_dir", type=Path, help="directory with metrics.jsonl and val_predictions.npz")
    parser.add_argument("--temperature", type=float, default=None, help="report this T instead of fitting one")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        parser.error(f"{args.run_dir} is not a directory")
    print(json.dumps(write_report(args.run_dir, args.temperature), indent=2))


if __name__ == "__main__":
    main()
