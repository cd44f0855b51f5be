"""Inference throughput: length-sorted token-budget batches vs fixed-size file-order batches, and a 2 x T4 projection.

    python bench/inference.py [--rows 400] [--max-length 1024] [--batch-tokens 8192] [--calibration calib.json]
    python bench/inference.py --calibrate [--out calib.json]     # on a CUDA GPU: measure the projection's factors

Part 1 (measured, CPU, same run): a tiny Llama classifier (hidden 64, 2 layers, Llama 3 vocabulary so real token ids
fit) scores real arena rows rendered with the Llama 3 tokenizer, once with our batching and once with fixed-size
batches in file order sized for the worst case (batch_tokens // max_length rows). Both process the same rows with
the same memory cap, so the ratio is what sorting and token budgets buy on the real length distribution.

Part 2 (projected): wall time of 25,000 rows of Gemma2-9B and Llama3-8B at max_length 2048 on 2 x T4 for each
mode (data-parallel 4-bit / 8-bit: one copy per GPU; pipeline fp16: one copy split over both GPUs) x TTA (on:
both views of every row; auto at 1/3: one view + the swapped view of a third; off), from the measured real token
lengths (bootstrap to 25,000 rows), FLOPs = 2 * params * tokens + 4 * layers * d_attn * tokens^2 per sequence,
padded as our batches pad, split across 2 GPUs by the LPT rule; and the ratio to the 2 x T4 physical limit (both
views, real unpadded lengths, 2 x 65 TFLOP/s fp16 at 100%). Every factor (MFU, quantization slowdowns, pipeline
efficiency, overheads) is in one dict with its source: "assumed", or "measured on <GPU>" when --calibration
FILE gives a file written by --calibrate.

--calibrate (needs a CUDA GPU; --allow-cpu checks the logic on the CPU with small shapes): times the forward of one
decoder layer's seven matmuls at Gemma2-9B shapes (hidden 3584, intermediate 14336, q 4096, kv 2048; 4 x 1024
tokens; random weights) as fp16 nn.Linear, bitsandbytes Linear8bitLt (int8, threshold 6 as arena-predict loads
it) and Linear4bit (NF4, fp16 compute), with cuda synchronize; writes the 8-bit and 4-bit slowdowns vs fp16 (ratios:
they transfer between GPUs, roughly) and the achieved fp16 TFLOP/s and share of that GPU's peak (absolute: only
a T4's is the projection's MFU; on another GPU it is recorded, not used). Matmuls alone: an upper bound on the
sustained MFU of whole forward passes (attention, norms, padding are not in it).
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference import batching  # noqa: E402

# Gemma2-9B (google/gemma-2-9b config.json), Llama3-8B (meta-llama/Meta-Llama-3-8B config.json)
GEMMA2_9B = dict(model_type="gemma2", hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, head_dim=256,
                 num_key_value_heads=8, intermediate_size=14336, vocab_size=256000)
LLAMA3_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, head_dim=128,
                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)
MODELS = {"gemma2-9b": GEMMA2_9B, "llama3-8b": LLAMA3_8B}
T4_PEAK_TFLOPS = 65.0  # fp16 tensor-core peak of one T4 (NVIDIA data sheet)
# fp16 tensor-core peaks (dense) by GPU name, for --calibrate's share of peak on whatever GPU is present
PEAK_TFLOPS = {"T4": 65.0, "L4": 121.0, "A10": 125.0, "V100": 125.0, "A100": 312.0, "L40S": 362.0, "H100": 989.0,
               "H200": 989.0, "P100": 18.7}


def assumptions() -> dict:
    """The projection's factors, each {"value", "source", "why"}; --calibration replaces some with measured ones."""
    a = lambda v, why: {"value": v, "source": "assumed", "why": why}  # noqa: E731
    return {
        "mfu": a(0.25, "sustained share of the T4 fp16 peak in prefill batches (70 W power cap throttles clocks; "
                       "eager attention; norms)"),
        "slowdown_8bit": a(2.0, "bnb int8 matmul with outlier decomposition vs fp16"),
        "slowdown_4bit": a(1.3, "bnb NF4 dequantizes each weight to fp16 per matmul"),
        "pipeline_efficiency": a(0.85, "pipeline fp16 over 2 GPUs: both busy on micro-batches, less the fill/drain "
                                       "bubble and the hidden-state transfer over PCIe between the halves"),
        "overhead_hours": a(0.3, "process start, tokenizing 25k rows, loading the weights from the Kaggle dataset"),
        "gemma_vs_llama3_tokens": a(1.0, "Gemma's 256k vocabulary tokenizes English about like Llama 3's 128k one"),
        "auto_share": a(1 / 3, "--tta auto swaps the most uncertain rows; a third is what the WSDM Cup winners "
                               "swapped (the share auto reaches depends on the budget)"),
    }


def read_calibration(path, factors: dict) -> dict:
    """Factors with the measured ones of a --calibrate JSON put in (the MFU only when measured on a T4)."""
    cal = json.loads(Path(path).read_text())
    out = {k: dict(v) for k, v in factors.items()}
    where = f"measured on {cal['gpu']}"
    for key in ("slowdown_8bit", "slowdown_4bit"):
        if cal.get(key) is not None:
            out[key] = {"value": float(cal[key]), "source": where, "why": "one layer's matmuls vs fp16 nn.Linear"}
    if cal.get("mfu_matmul") is not None and "T4" in cal["gpu"]:
        out["mfu"] = {"value": float(cal["mfu_matmul"]), "source": where,
                      "why": "fp16 matmuls only: an upper bound on whole forward passes"}
    return out
T4_ROWS = 25_000
T4_MAX_LENGTH = 2048
T4_BATCH_TOKENS = 8192
KAGGLE_HOURS = 9.0


def real_lengths(rows: int | None, max_length: int):
    """(rendered ids at max_length, untruncated lengths) of real rows with the Llama 3 tokenizer."""
    from data.reading import read_battles
    from data.template import FormatConfig, Formatter
    from data.tokenizer import load_tokenizer
    from tests.conftest import LLAMA3_TOKENIZER, REAL_TRAIN

    if not REAL_TRAIN.exists() or not LLAMA3_TOKENIZER.exists():
        sys.exit(f"needs {REAL_TRAIN} and {LLAMA3_TOKENIZER} (set ARENA_SHARED)")
    battles = read_battles(REAL_TRAIN)
    fmt = Formatter(load_tokenizer(LLAMA3_TOKENIZER), FormatConfig(max_length=max_length))
    turns = fmt.tokenize(battles)
    full = np.array([fmt.full_lengths(t) for t in turns])
    rendered = [np.asarray(fmt.render(t), dtype=np.int64) for t in turns[:rows]]
    return rendered, full


def tiny_model(threads: int):
    import torch
    from transformers import AutoModel, LlamaConfig

    from inference.modeling import ArenaClassifier

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    model = ArenaClassifier(AutoModel.from_config(cfg, attn_implementation="sdpa"))
    model.reset_head()
    return model.eval()


def run(model, seqs, batches) -> float:
    """Seconds to score all batches (padded, right padding)."""
    import torch

    from inference.worker import pad_batch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            ids, mask = pad_batch([seqs[i] for i in b], 0)
            model(ids, attention_mask=mask)
    return time.perf_counter() - t0


def measure(args) -> dict:
    seqs, full = real_lengths(args.rows, args.max_length)
    lengths = np.array([len(s) for s in seqs])
    model = tiny_model(args.threads)
    ours = batching.token_budget_batches(lengths, args.batch_tokens, args.max_batch_rows)
    size = max(1, args.batch_tokens // args.max_length)  # fixed batches must fit the longest possible rows
    fixed = batching.fixed_batches(len(seqs), size)
    run(model, seqs, ours[:2])  # warm-up
    t_fixed, t_ours = [], []
    for _ in range(args.repeats):  # interleaved, best of N: both see the same machine state
        t_fixed.append(run(model, seqs, fixed))
        t_ours.append(run(model, seqs, ours))
    res = {
        "rows": len(seqs), "max_length": args.max_length, "batch_tokens": args.batch_tokens, "fixed_batch_size": size,
        "rows_per_s_ours": len(seqs) / min(t_ours), "rows_per_s_fixed": len(seqs) / min(t_fixed),
        "padded_tokens_ours": batching.padded_tokens(ours, lengths),
        "padded_tokens_fixed": batching.padded_tokens(fixed, lengths), "real_tokens": int(lengths.sum()),
        "batches_ours": len(ours), "batches_fixed": len(fixed),
    }
    res["speedup"] = res["rows_per_s_ours"] / res["rows_per_s_fixed"]
    return res, full


def project(full: np.ndarray, factors: dict, model: dict = GEMMA2_9B, seed: int = 0) -> dict:
    """2 x T4 hours for 25k rows at max_length 2048 per mode x TTA, and the physical limit (see `assumptions`)."""
    f = {k: v["value"] for k, v in factors.items()}
    cost = batching.CostModel.from_config(SimpleNamespace(**model))
    rng = np.random.default_rng(seed)
    sample = np.round(rng.choice(full, T4_ROWS, replace=True) * f["gemma_vs_llama3_tokens"]).astype(np.int64)
    lengths = batching.row_lengths(sample, T4_MAX_LENGTH)
    third = rng.choice(T4_ROWS, int(round(f["auto_share"] * T4_ROWS)), replace=False)  # entropy ~ unrelated to length

    def span(rows) -> float:
        """FLOPs on the busier GPU: one view of `rows` in our length-sorted token-budget batches, LPT over 2 GPUs."""
        batches = [[rows[i] for i in b] for b in batching.token_budget_batches(lengths[rows], T4_BATCH_TOKENS, 64)]
        return batching.makespan([len(b) * cost.flops(max(lengths[i] for i in b)) for b in batches], 2)

    def total(rows) -> float:
        batches = [[rows[i] for i in b] for b in batching.token_budget_batches(lengths[rows], T4_BATCH_TOKENS, 64)]
        return float(sum(len(b) * cost.flops(max(lengths[i] for i in b)) for b in batches))

    everything = np.arange(T4_ROWS)
    views = {"off": [everything], "auto_1/3": [everything, third], "on": [everything, everything]}
    fixed = batching.fixed_batches(T4_ROWS, max(1, T4_BATCH_TOKENS // T4_MAX_LENGTH))
    fixed_span = batching.makespan([len(b) * cost.flops(max(lengths[i] for i in b)) for b in fixed], 2)
    rate = T4_PEAK_TFLOPS * 1e12 * f["mfu"]  # FLOP/s of one T4, fp16
    limit_h = 2 * float(cost.flops(lengths).sum()) / (2 * T4_PEAK_TFLOPS * 1e12) / 3600  # both views, unpadded
    out = {"params_nonembedding": cost.params, "mean_tokens": float(lengths.mean()),
           "truncated_share": float(np.mean(sample > T4_MAX_LENGTH)), "physical_limit_hours": limit_h, "modes": {}}
    for mode, slow, parallel in (("dp_4bit", f["slowdown_4bit"], "data"), ("dp_8bit", f["slowdown_8bit"], "data"),
                                 ("pipeline_fp16", 1.0, "pipeline")):
        for tta, parts in views.items():
            if parallel == "data":  # one copy per GPU: the busier GPU's share of each pass
                seconds = sum(span(r) for r in parts) / rate * slow
            else:  # one copy over both GPUs: twice the rate, less the bubble/transfer
                seconds = sum(total(r) for r in parts) / (2 * rate * f["pipeline_efficiency"])
            hours = seconds / 3600 + f["overhead_hours"]
            out["modes"][f"{mode}/{tta}"] = {"hours": hours, "compute_hours": seconds / 3600,
                                             "ratio_to_limit": seconds / 3600 / limit_h}
    out["hours_fixed_4bit"] = fixed_span / rate * f["slowdown_4bit"] / 3600 + f["overhead_hours"]
    return out


def recommend(tables: dict) -> str:
    """Gemma2-9B with --tta auto, in the first mode whose full-TTA projection fits the 9 h with an hour to spare,
    data-parallel 4-bit first (the path public notebooks measured; pipeline fp16 rests on an assumed efficiency).
    With auto, a projection that holds means every row is swapped (the same as on); one that does not means the
    least useful swaps are dropped instead of the budget. Nothing fits with TTA: the fastest one-view mode."""
    t = tables["gemma2-9b"]["modes"]
    for m in ("dp_4bit", "pipeline_fp16", "dp_8bit"):
        h = t[f"{m}/on"]["hours"]
        if h <= KAGGLE_HOURS - 1:
            return f"Gemma2-9B {m} with --tta auto (full TTA projected {h:.1f} h: auto then swaps every row)"
    h, m = min((t[f"{m}/off"]["hours"], m) for m in ("dp_4bit", "pipeline_fp16", "dp_8bit"))
    return f"Gemma2-9B {m} with --tta auto (one view projected {h:.1f} h; auto swaps what fits)"


# ---------------------------------------------------------------------------------------------------------------
def calibrate(args) -> dict:
    """Time one layer's matmuls as fp16 nn.Linear, bnb int8 and bnb NF4 (see the module doc)."""
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if cuda:
        hidden, inter, q, kv, tokens = 3584, 14336, 4096, 2048, args.calib_tokens
        gpu = torch.cuda.get_device_name(0)
        dtype = torch.float16
    else:  # --allow-cpu: the logic, at small shapes (CPU numbers mean nothing for a T4)
        hidden, inter, q, kv, tokens = 256, 1024, 256, 128, 256
        gpu = "cpu (logic check only)"
        dtype = torch.float32
    shapes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * i ** -0.5 for i, o in shapes]
    x = {i: torch.randn(tokens, i, dtype=dtype, device=dev) for i in {i for i, _ in shapes}}
    flops = 2.0 * tokens * sum(i * o for i, o in shapes)

    def layers(kind):
        import bitsandbytes as bnb

        out = []
        for (i, o), w in zip(shapes, weights):
            if kind == "fp16":
                lin = torch.nn.Linear(i, o, bias=False, dtype=dtype)
                lin.weight.data.copy_(w.to(dtype))
            elif kind == "8bit":
                lin = bnb.nn.Linear8bitLt(i, o, bias=False, has_fp16_weights=False, threshold=6.0)
                lin.weight = bnb.nn.Int8Params(w.to(dtype), requires_grad=False, has_fp16_weights=False)
            else:
                lin = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=dtype, quant_type="nf4")
                lin.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type="nf4")
            out.append(lin.to(dev))  # bnb quantizes on the move to the device
        return out

    def seconds(mods) -> float:
        def once():
            for (i, _), m in zip(shapes, mods):
                m(x[i])
        with torch.inference_mode():
            for _ in range(args.calib_warmup):
                once()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.calib_iters):
                once()
            if cuda:
                torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.calib_iters

    res = {"gpu": gpu, "tokens": tokens, "shapes": shapes, "layer_gflop": flops / 1e9}
    times = {}
    for kind in ("fp16", "8bit", "4bit"):
        try:
            times[kind] = seconds(layers(kind))
        except Exception as e:  # noqa: BLE001 - a kind that cannot run here is reported, the rest still measured
            res[f"error_{kind}"] = f"{type(e).__name__}: {e}"[:300]
        if cuda:
            torch.cuda.empty_cache()
    fp16 = times.get("fp16")
    res["seconds"] = times
    res["fp16_tflops"] = flops / fp16 / 1e12 if fp16 else None
    for kind in ("8bit", "4bit"):
        res[f"slowdown_{kind}"] = times[kind] / fp16 if fp16 and kind in times else None
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    res["peak_tflops"] = peak
    res["mfu_matmul"] = res["fp16_tflops"] / peak if peak and res["fp16_tflops"] else None
    res["note"] = ("ratios (slowdowns) transfer to a T4 roughly; the absolute TFLOP/s and MFU are this GPU's"
                   + ("" if "T4" in gpu else " and are not used for the T4 projection"))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=300, help="real rows scored on the CPU (of 999)")
    p.add_argument("--max-length", type=int, default=2048, help="as on Kaggle")
    p.add_argument("--batch-tokens", type=int, default=16384, help="fixed batches get batch_tokens // max_length rows (8: a common choice)")
    p.add_argument("--max-batch-rows", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--calibration", metavar="FILE",
                   help="a --calibrate JSON: its measured factors replace the assumed ones")
    p.add_argument("--skip-measure", action="store_true", help="only the projection (no CPU throughput part)")
    p.add_argument("--calibrate", action="store_true", help="measure the quantization slowdowns and MFU on this GPU")
    p.add_argument("--out", default="calibration.json", help="where --calibrate writes (default %(default)s)")
    p.add_argument("--allow-cpu", action="store_true", help="--calibrate on a CPU at small shapes (logic check)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="tokens per matmul (4 x 1024; default %(default)s)")
    p.add_argument("--calib-iters", type=int, default=20)
    p.add_argument("--calib-warmup", type=int, default=3)
    args = p.parse_args(argv)

    if args.calibrate:
        import torch

        if not torch.cuda.is_available() and not args.allow_cpu:
            print("bench/inference.py: --calibrate needs a CUDA GPU (torch.cuda.is_available() is False); "
                  "--allow-cpu checks its logic on the CPU at small shapes", file=sys.stderr)
            print(json.dumps({"gpu": False}))
            return 2
        res = calibrate(args)
        tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, args.out)
        print(f"{res['gpu']}: one layer ({res['layer_gflop']:.1f} GFLOP) fp16 {res['seconds'].get('fp16', 0):.4f} s "
              f"({res['fp16_tflops'] or 0:.1f} TFLOP/s, MFU {res['mfu_matmul'] or float('nan'):.2f}); slowdowns 8bit "
              f"{res['slowdown_8bit']}, 4bit {res['slowdown_4bit']}; {res['note']}; written to {args.out}",
              file=sys.stderr)
        print(json.dumps(res))
        return 0

    factors = assumptions()
    if args.calibration:
        try:
            factors = read_calibration(args.calibration, factors)
        except (OSError, ValueError, KeyError) as e:
            print(f"bench/inference.py: --calibration {args.calibration}: cannot read it ({e})", file=sys.stderr)
            return 2
    result = {}
    if args.skip_measure:
        _, full = real_lengths(0, args.max_length)
    else:
        m, full = measure(args)
        print(f"CPU, tiny Llama (hidden 64, 2 layers, vocab 128256), {m['rows']} real rows at max_length "
              f"{m['max_length']}, {args.threads} threads")
        print(f"  ours : length-sorted, <= {m['batch_tokens']} padded tokens/batch: {m['batches_ours']} batches, "
              f"{m['padded_tokens_ours']} tokens computed, {m['rows_per_s_ours']:.1f} rows/s")
        print(f"  fixed: file order, {m['fixed_batch_size']} rows/batch: {m['batches_fixed']} batches, "
              f"{m['padded_tokens_fixed']} tokens computed, {m['rows_per_s_fixed']:.1f} rows/s")
        print(f"  real tokens {m['real_tokens']}; speedup {m['speedup']:.2f}x "
              f"(padding alone: {m['padded_tokens_fixed'] / m['padded_tokens_ours']:.2f}x fewer tokens)")
        result = {"speedup": round(m["speedup"], 3), "rows_per_s_ours": round(m["rows_per_s_ours"], 2),
                  "rows_per_s_fixed": round(m["rows_per_s_fixed"], 2),
                  "padding_ratio": round(m["padded_tokens_fixed"] / m["padded_tokens_ours"], 3)}

    tables = {name: project(full, factors, cfg) for name, cfg in MODELS.items()}
    t = tables["gemma2-9b"]
    print(f"\nProjection: {T4_ROWS} rows at max_length {T4_MAX_LENGTH} on 2 x T4 (Kaggle limit {KAGGLE_HOURS:g} h):")
    print(f"  lengths: the {len(full)} real train rows (Llama 3 tokenizer) bootstrapped to {T4_ROWS}; mean "
          f"{t['mean_tokens']:.0f} tokens after truncation, {100 * t['truncated_share']:.0f}% of rows truncated")
    print(f"  FLOPs/sequence = 2 x non-embedding params x L + 4 x layers x d_attn x L^2; padded as our "
          f"{T4_BATCH_TOKENS}-token batches pad; data-parallel: LPT split over 2 GPUs")
    print(f"  physical limit: both views, unpadded, 2 x {T4_PEAK_TFLOPS:g} TFLOP/s at 100%")
    for k, v in factors.items():
        print(f"  {k:22s} {v['value']:.3g}  ({v['source']}: {v['why']})")
    print("  (fp16 9B/8B weights are ~16-18 GB: one copy does not fit a 16 GB T4; split over both it does)")
    print(f"  {'model':10s} {'mode':14s} {'TTA on':>16s} {'TTA auto 1/3':>16s} {'TTA off':>16s}   (hours, x limit)")
    for name, tab in tables.items():
        for mode in ("dp_4bit", "dp_8bit", "pipeline_fp16"):
            cells = [tab["modes"][f"{mode}/{tta}"] for tta in ("on", "auto_1/3", "off")]
            print(f"  {name:10s} {mode:14s} " + " ".join(f"{c['hours']:6.2f} h ({c['ratio_to_limit']:4.2f}x)"
                                                         for c in cells))
        print(f"  {name:10s} physical limit (both views) {tab['physical_limit_hours']:.2f} h")
    rec = recommend(tables)
    print(f"  recommended: {rec}")
    result.update({
        "t4_hours": round(t["modes"]["dp_4bit/off"]["hours"], 2),
        "t4_hours_tta": round(t["modes"]["dp_4bit/on"]["hours"], 2),
        "t4_hours_8bit": round(t["modes"]["dp_8bit/off"]["hours"], 2),
        "t4_hours_tta_8bit": round(t["modes"]["dp_8bit/on"]["hours"], 2),
        "t4_hours_fixed_batches": round(t["hours_fixed_4bit"], 2), "t4_quantize": "4bit",
        "t4_mfu": factors["mfu"]["value"], "t4_rows": T4_ROWS, "t4_max_length": T4_MAX_LENGTH,
        "projection": {name: {"physical_limit_hours": round(tab["physical_limit_hours"], 3),
                              **{k: {kk: round(vv, 3) for kk, vv in c.items()} for k, c in tab["modes"].items()}}
                       for name, tab in tables.items()},
        "factors": {k: {"value": v["value"], "source": v["source"]} for k, v in factors.items()},
        "recommended": rec})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
