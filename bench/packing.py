"""How many computed tokens are real, and how evenly ranks are loaded: padded batching vs length-grouped packing.

Run from the repository root (needs the shared sample and Llama 3 tokenizer; ARENA_SHARED overrides ../shared):

    python bench/packing.py [--batch-size 8] [--seeds 5]

On the real sample (999 rows, Llama 3 tokenizer, FormatConfig(max_length=2048 / 4096)) it compares, over 2 and 8 ranks:
  random       shuffled batches of `batch_size` padded to their longest row (a plain DataLoader)
  max_length   every row padded to max_length (static shapes)
  group_len    HF Trainer group_by_length: LengthGroupedSampler (megabatches of min(50, n // 4b) batches sorted by
               length, the longest batch first), batches dealt round-robin to ranks as accelerate does
  packed       data.packing.PackedBatchSampler with max_tokens = batch_size x max_length (same memory bound)
Metrics: `fraction` real tokens / computed tokens; `dp_fraction` real tokens / (steps x ranks x the busiest rank's
tokens), i.e. also counting the time ranks wait for the slowest; `imbalance` mean over steps of max/min computed tokens
per rank (`worst`: the worst step); for packing also the attention imbalance (sum of squared lengths) and bin fill.
Padded baselines drop an incomplete last step (every rank must take part in each step). The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.packing import epoch_layout  # noqa: E402

SHARED = Path(os.environ.get("ARENA_SHARED", ROOT.parent / "shared"))


def real_lengths(max_lengths: list[int]) -> dict[int, np.ndarray]:
    """Rendered token lengths of the real sample for each max_length (tokenized once)."""
    from data.reading import read_battles
    from data.template import FormatConfig, Formatter
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(SHARED / "tokenizers" / "llama3" / "tokenizer.model")
    battles = read_battles(SHARED / "data" / "arena-sample" / "train.csv")
    turns = Formatter(tok, FormatConfig(max_length=max(max_lengths))).tokenize(battles)
    out = {}
    for m in max_lengths:
        fmt = Formatter(tok, FormatConfig(max_length=m))
        out[m] = np.array([len(fmt.render(t)) for t in turns])
    return out


def random_batches(n: int, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n)
    return [perm[s : s + batch] for s in range(0, n, batch)]


def group_by_length_batches(lengths: np.ndarray, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """transformers' get_length_grouped_indices, then consecutive batches (re-implemented, same rules)."""
    n = len(lengths)
    mult = max(1, min(n // (batch * 4), 50))
    perm = rng.permutation(n)
    megas = [sorted(perm[s : s + mult * batch], key=lambda i: -lengths[i]) for s in range(0, n, mult * batch)]
    top = int(np.argmax([lengths[m[0]] for m in megas]))
    megas[0][0], megas[top][0] = megas[top][0], megas[0][0]  # the longest batch first: OOM shows up at once
    flat = np.array([i for m in megas for i in m])
    return [flat[s : s + batch] for s in range(0, n, batch)]


def padded_stats(batches: list[np.ndarray], lengths: np.ndarray, ranks: int, pad_to: int | None = None) -> dict:
    """Round-robin batches to ranks (step s = batches s*ranks .. s*ranks+ranks-1), incomplete last step dropped."""
    steps = len(batches) // ranks
    real = np.zeros((steps, ranks))
    computed = np.zeros((steps, ranks))
    for s in range(steps):
        for r in range(ranks):
            b = batches[s * ranks + r]
            real[s, r] = lengths[b].sum()
            computed[s, r] = len(b) * (pad_to or lengths[b].max())
    return summarize(real, computed)


def packed_stats(lengths: np.ndarray, max_tokens: int, ranks: int, seed: int) -> dict:
    steps = epoch_layout(lengths.tolist(), max_tokens, ranks, seed=seed, epoch=0)
    real = np.array([[lengths[b].sum() for b in step] for step in steps], dtype=float)
    squares = np.array([[(lengths[b].astype(float) ** 2).sum() for b in step] for step in steps])
    out = summarize(real, real.copy())  # a packed row has no padding: computed tokens are real tokens
    out["attn_imbalance"] = float((squares.max(1) / squares.min(1)).mean())
    out["fill"] = float(real.sum() / (real.size * max_tokens))
    return out


def summarize(real: np.ndarray, computed: np.ndarray) -> dict:
    ratio = computed.max(1) / computed.min(1)
    return {
        "fraction": float(real.sum() / computed.sum()),
        "dp_fraction": float(real.sum() / (computed.max(1).sum() * computed.shape[1])),
        "imbalance": float(ratio.mean()),
        "worst": float(ratio.max()),
        "steps": int(computed.shape[0]),
    }


def mean_over_seeds(runs: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in runs])) if k != "worst" else float(np.max([r[k] for r in runs]))
            for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8, help="padded batch size; max_tokens = batch x max_length")
    ap.add_argument("--seeds", type=int, default=5, help="shuffles averaged (worst: max over them)")
    args = ap.parse_args()

    lengths_by_ml = real_lengths([2048, 4096])
    results: dict[str, dict] = {}
    print(f"{'max_len':>7} {'ranks':>5} {'method':>10} {'fraction':>8} {'dp_frac':>8} {'imbal':>7} {'worst':>7} "
          f"{'steps':>6}  extra")
    for ml, lengths in lengths_by_ml.items():
        max_tokens = args.batch_size * ml
        for ranks in (2, 8):
            rows = {
                "random": [padded_stats(random_batches(len(lengths), args.batch_size, np.random.default_rng(s)),
                                        lengths, ranks) for s in range(args.seeds)],
                "max_length": [padded_stats(random_batches(len(lengths), args.batch_size, np.random.default_rng(s)),
                                            lengths, ranks, pad_to=ml) for s in range(args.seeds)],
                "group_len": [padded_stats(group_by_length_batches(lengths, args.batch_size,
                                                                   np.random.default_rng(s)), lengths, ranks)
                              for s in range(args.seeds)],
                "packed": [packed_stats(lengths, max_tokens, ranks, s) for s in range(args.seeds)],
            }
            for method, runs in rows.items():
                r = mean_over_seeds(runs)
                results[f"{ml}/{ranks}/{method}"] = r
                extra = (f"attn_imbalance={r['attn_imbalance']:.3f} fill={r['fill']:.3f} max_tokens={max_tokens}"
                         if method == "packed" else "")
                print(f"{ml:>7} {ranks:>5} {method:>10} {r['fraction']:>8.3f} {r['dp_fraction']:>8.3f} "
                      f"{r['imbalance']:>7.3f} {r['worst']:>7.3f} {r['steps']:>6.1f}  {extra}")
    L = lengths_by_ml[2048]
    key = "2048/8/"
    summary = {
        "rows": int(len(L)), "mean_len_2048": float(L.mean()), "batch_size": args.batch_size,
        "packed_fraction": results[key + "packed"]["dp_fraction"],
        "packed_imbalance": results[key + "packed"]["imbalance"],
        "packed_imbalance_worst": results[key + "packed"]["worst"],
        "packed_attn_imbalance": results[key + "packed"]["attn_imbalance"],
        "random_fraction": results[key + "random"]["fraction"],
        "max_length_fraction": results[key + "max_length"]["fraction"],
        "group_by_length_fraction": results[key + "group_len"]["fraction"],
        "random_dp_fraction": results[key + "random"]["dp_fraction"],
        "group_by_length_dp_fraction": results[key + "group_len"]["dp_fraction"],
        "random_imbalance": results[key + "random"]["imbalance"],
        "group_by_length_imbalance": results[key + "group_len"]["imbalance"],
        "packed_fraction_4096": results["4096/8/packed"]["dp_fraction"],
        "packed_imbalance_4096": results["4096/8/packed"]["imbalance"],
        "packed_imbalance_2ranks": results["2048/2/packed"]["imbalance"],
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))


if __name__ == "__main__":
    main()
