"""Inference throughput: length-sorted token-budget batches vs fixed-size file-order batches, and a 2 x T4 projection.

    python bench/inference.py [--rows 400] [--max-length 1024] [--batch-tokens 8192]

Part 1 (measured, CPU, same run): a tiny Llama classifier (hidden 64, 2 layers, Llama 3 vocabulary so real token ids
fit) scores real arena rows rendered with the Llama 3 tokenizer, once with our batching and once with fixed-size
batches in file order sized for the worst case (batch_tokens // max_length rows). Both process the same rows with
the same memory cap, so the ratio is what sorting and token budgets buy on the real length distribution.

Part 2 (projected): wall time of 25,000 rows of Gemma2-9B at max_length 2048 on 2 x T4, from the measured real
token lengths (bootstrap to 25,000 rows), FLOPs = 2 * params * tokens + 4 * layers * d_attn * tokens^2 per
sequence, padded as our batches pad, split across 2 GPUs by the LPT rule. The assumptions are printed.
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

# Gemma2-9B (google/gemma-2-9b config.json)
GEMMA2_9B = dict(model_type="gemma2", hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, head_dim=256,
                 num_key_value_heads=8, intermediate_size=14336, vocab_size=256000)
T4 = dict(
    peak_tflops=65.0,  # fp16 tensor-core peak of one T4
    mfu=0.25,  # sustained share of peak in prefill batches (70 W power cap throttles clocks; eager attention; norms)
    slowdown={"fp16": 1.0, "8bit": 2.0, "4bit": 1.3},  # bnb: 4-bit dequantizes to fp16 per matmul; int8 is slower
    overhead_hours=0.3,  # process start, tokenizing 25k rows, loading 9B weights from the Kaggle dataset
    gemma_vs_llama3_tokens=1.0,  # Gemma's 256k vocabulary tokenizes English about like Llama 3's 128k one
)
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


def project(full: np.ndarray, seed: int = 0) -> dict:
    """2 x T4 hours for 25k rows of Gemma2-9B at max_length 2048 (see the printed assumptions)."""
    cost = batching.CostModel.from_config(SimpleNamespace(**GEMMA2_9B))
    rng = np.random.default_rng(seed)
    sample = np.round(rng.choice(full, T4_ROWS, replace=True) * T4["gemma_vs_llama3_tokens"]).astype(np.int64)
    lengths = batching.row_lengths(sample, T4_MAX_LENGTH)

    def batch_flops(batches, seqs_per_row):
        return np.array([seqs_per_row * len(b) * cost.flops(max(lengths[i] for i in b)) for b in batches])

    ours = batching.token_budget_batches(lengths, T4_BATCH_TOKENS, 64)
    fixed = batching.fixed_batches(T4_ROWS, max(1, T4_BATCH_TOKENS // T4_MAX_LENGTH))
    ours_tta = [b for b in batching.token_budget_batches(lengths, T4_BATCH_TOKENS // 2, 32)]  # 2 seqs per row
    flops_per_s = T4["peak_tflops"] * 1e12 * T4["mfu"]
    out = {"params_nonembedding": cost.params, "mean_tokens": float(lengths.mean()),
           "truncated_share": float(np.mean(sample > T4_MAX_LENGTH))}
    for name, batches, spr in (("ours", ours, 1), ("ours_tta", ours_tta, 2), ("fixed", fixed, 1)):
        span = batching.makespan(batch_flops(batches, spr), 2)  # FLOPs on the busier GPU
        for q, slow in T4["slowdown"].items():
            out[f"hours_{name}_{q}"] = span / flops_per_s * slow / 3600 + T4["overhead_hours"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=300, help="real rows scored on the CPU (of 999)")
    p.add_argument("--max-length", type=int, default=2048, help="as on Kaggle")
    p.add_argument("--batch-tokens", type=int, default=16384, help="fixed batches get batch_tokens // max_length rows (8: a common choice)")
    p.add_argument("--max-batch-rows", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()

    m, full = measure(args)
    print(f"CPU, tiny Llama (hidden 64, 2 layers, vocab 128256), {m['rows']} real rows at max_length "
          f"{m['max_length']}, {args.threads} threads")
    print(f"  ours : length-sorted, <= {m['batch_tokens']} padded tokens/batch: {m['batches_ours']} batches, "
          f"{m['padded_tokens_ours']} tokens computed, {m['rows_per_s_ours']:.1f} rows/s")
    print(f"  fixed: file order, {m['fixed_batch_size']} rows/batch: {m['batches_fixed']} batches, "
          f"{m['padded_tokens_fixed']} tokens computed, {m['rows_per_s_fixed']:.1f} rows/s")
    print(f"  real tokens {m['real_tokens']}; speedup {m['speedup']:.2f}x "
          f"(padding alone: {m['padded_tokens_fixed'] / m['padded_tokens_ours']:.2f}x fewer tokens)")

    t = project(full)
    print(f"\nProjection: {T4_ROWS} rows of Gemma2-9B at max_length {T4_MAX_LENGTH} on 2 x T4 (assumptions):")
    print(f"  lengths: the {len(full)} real train rows (Llama 3 tokenizer) bootstrapped to {T4_ROWS}, x"
          f"{T4['gemma_vs_llama3_tokens']} for Gemma's tokenizer; mean {t['mean_tokens']:.0f} tokens after "
          f"truncation, {100 * t['truncated_share']:.0f}% of rows truncated")
    print(f"  FLOPs/sequence = 2 x {t['params_nonembedding'] / 1e9:.2f}e9 non-embedding params x L + 4 x 42 layers x "
          f"4096 x L^2; padded as our {T4_BATCH_TOKENS}-token batches pad; LPT split over 2 GPUs")
    print(f"  T4: {T4['peak_tflops']} TFLOPs fp16 peak x MFU {T4['mfu']}; slowdown vs fp16: "
          f"{', '.join(f'{k} {v}x' for k, v in T4['slowdown'].items())}; +{T4['overhead_hours']} h start-up/loading")
    print("  (fp16 9B weights are ~18 GB: they do not fit a 16 GB T4, so 4-bit/8-bit are the real options)")
    for q in T4["slowdown"]:
        a, b, c = t[f"hours_ours_{q}"], t[f"hours_ours_tta_{q}"], t[f"hours_fixed_{q}"]
        fits = lambda h: "fits" if h <= KAGGLE_HOURS else "OVER"  # noqa: E731
        print(f"  {q:5s}: no TTA {a:5.2f} h ({fits(a)} 9 h), TTA {b:5.2f} h ({fits(b)}), "
              f"fixed unsorted batches {c:5.2f} h")
    result = {"speedup": round(m["speedup"], 3), "rows_per_s_ours": round(m["rows_per_s_ours"], 2),
              "rows_per_s_fixed": round(m["rows_per_s_fixed"], 2),
              "padding_ratio": round(m["padded_tokens_fixed"] / m["padded_tokens_ours"], 3),
              "t4_hours": round(t["hours_ours_4bit"], 2), "t4_hours_tta": round(t["hours_ours_tta_4bit"], 2),
              "t4_hours_8bit": round(t["hours_ours_8bit"], 2), "t4_hours_tta_8bit": round(t["hours_ours_tta_8bit"], 2),
              "t4_hours_fixed_batches": round(t["hours_fixed_4bit"], 2), "t4_quantize": "4bit",
              "t4_mfu": T4["mfu"], "t4_rows": T4_ROWS, "t4_max_length": T4_MAX_LENGTH}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
