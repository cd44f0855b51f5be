"""CPU training throughput of a tiny Llama classifier: packed micro-batches vs random padded batches, same examples.

Run from the repository root (needs the shared sample and Llama 3 tokenizer; ARENA_SHARED overrides ../shared):

    python bench/train_throughput.py [--rows 200] [--max-length 2048] [--batch-size 8]   (about a minute)

The examples are the real sample rendered with the Llama 3 tokenizer (FormatConfig(max_length)), so the length
distribution is the real long tail; ids are folded into the tiny vocabulary (speed does not depend on them).
  padded  random batches of `batch_size` padded to their longest row, attention_mask, sdpa (a plain DataLoader)
  packed  PackedBatchSampler(max_tokens = batch_size x max_length) + collate_packed, with the CPU varlen attention
          (`arena_varlen`, the twin of flash-attention varlen: attention per example, no (T, T) mask)
Both train the same initial model with AdamW for one epoch over the same examples, on one thread (--threads). The
machine may be shared with other jobs, so the two are timed in interleaved chunks (padded chunk, packed chunk, ...)
and `speedup` uses the process CPU time, which other jobs do not inflate; the wall-clock ratio is printed as well.
Tokens/s counts real (non-pad) tokens. The last line is JSON with `speedup` = packed / padded real tokens per second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.packing import (  # noqa: E402
    PackedBatchSampler, collate_packed, packed_forward_kwargs, packed_loss, register_varlen_attention,
)
from inference.modeling import ArenaClassifier  # noqa: E402

SHARED = Path(os.environ.get("ARENA_SHARED", ROOT.parent / "shared"))
VOCAB = 2048


def real_examples(rows: int, max_length: int, seed: int) -> list[dict]:
    from data.reading import read_battles
    from data.template import FormatConfig, Formatter
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(SHARED / "tokenizers" / "llama3" / "tokenizer.model")
    battles = read_battles(SHARED / "data" / "arena-sample" / "train.csv")
    pick = np.random.default_rng(seed).permutation(len(battles))[:rows]
    chosen = [battles[i] for i in pick]
    ids = Formatter(tok, FormatConfig(max_length=max_length)).encode(chosen)
    return [{"input_ids": [t % VOCAB for t in x], "label": int(b.label)} for x, b in zip(ids, chosen)]


def tiny_model(attn: str, hidden: int) -> ArenaClassifier:
    from transformers import AutoModel, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, pad_token_id=0)
    model = ArenaClassifier(AutoModel.from_config(cfg, attn_implementation=attn))
    model.reset_head()
    return model.train()


def padded_batch(examples: list[dict]) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for r, e in enumerate(examples):  # right padding: the classifier pools the last real token
        ids[r, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[r, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}


class Trainer:
    """One model + optimizer; `run(batches)` trains on them and accumulates wall time, real tokens and losses."""

    def __init__(self, model: ArenaClassifier, forward):
        self.model, self.forward = model, forward
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.seconds, self.cpu_seconds, self.tokens, self.losses = 0.0, 0.0, 0, []

    def step(self, batch: dict) -> float:
        loss = packed_loss(self.forward(self.model, batch), batch["labels"])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def run(self, batches: list[dict], real_tokens: int) -> None:
        start, cpu_start = time.perf_counter(), time.process_time()
        self.losses += [self.step(b) for b in batches]
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu_start
        self.tokens += real_tokens


def real_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())  # a packed row has no padding


def chunks(items: list, k: int) -> list[list]:
    return [items[i * len(items) // k : (i + 1) * len(items) // k] for i in range(k)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved timing chunks per method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time measures the work exactly)")
    ap.add_argument("--packed-attn", default="arena_varlen",
                    help="attention of the packed model: arena_varlen, or sdpa (transformers' (T, T) mask route)")
    ap.add_argument("--max-tokens", type=int, default=0, help="packed row budget (default batch_size x max_length)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    examples = real_examples(args.rows, args.max_length, args.seed)
    lengths = [len(e["input_ids"]) for e in examples]
    real = int(sum(lengths))
    perm = np.random.default_rng(args.seed).permutation(len(examples))
    padded = [padded_batch([examples[i] for i in perm[s : s + args.batch_size]])
              for s in range(0, len(examples), args.batch_size)]
    max_tokens = args.max_tokens or args.batch_size * args.max_length
    packed = [collate_packed([examples[i] for i in b])
              for b in PackedBatchSampler(lengths, max_tokens, seed=args.seed)]

    register_varlen_attention()
    attn = args.packed_attn
    trainers = {
        "padded": Trainer(tiny_model("sdpa", args.hidden), lambda m, b: m(b["input_ids"], b["attention_mask"])),
        "packed": Trainer(tiny_model(attn, args.hidden), lambda m, b: m(**packed_forward_kwargs(b, attn))),
    }
    warm = {"padded": padded[0], "packed": packed[0]}
    for name, t in trainers.items():  # first-call overheads (allocator, kernels) out of the timing
        t.step(warm[name])
    computed = {"padded": int(sum(b["input_ids"].numel() for b in padded)), "packed": real}
    parts = {"padded": chunks(padded, args.rounds), "packed": chunks(packed, args.rounds)}
    for r in range(args.rounds):
        for name, t in trainers.items():
            batch_list = parts[name][r]
            t.run(batch_list, sum(real_tokens(b) for b in batch_list))

    rate = {k: t.tokens / t.cpu_seconds for k, t in trainers.items()}
    wall = {k: t.tokens / t.seconds for k, t in trainers.items()}
    for name, t in trainers.items():
        assert t.tokens == real, (name, t.tokens, real)  # every real token trained once per method
        print(f"{name:>7}: {sum(map(len, parts[name])):>4} micro-batches, "
              f"{computed[name] / real:.2f} computed/real tokens, "
              f"CPU {t.cpu_seconds:6.1f} s ({rate[name]:6.0f} real tokens/s), "
              f"wall {t.seconds:6.1f} s ({wall[name]:6.0f}/s), "
              f"mean loss first/last quarter {np.mean(t.losses[: len(t.losses) // 4]):.3f}/"
              f"{np.mean(t.losses[-len(t.losses) // 4 :]):.3f}")
    result = {
        "speedup": round(rate["packed"] / rate["padded"], 3),
        "packed_tokens_per_s": round(rate["packed"]), "padded_tokens_per_s": round(rate["padded"]),
        "wall_speedup": round(wall["packed"] / wall["padded"], 3),
        "padded_real_fraction": round(real / computed["padded"], 4),
        "rows": len(examples), "real_tokens": real, "max_length": args.max_length, "max_tokens": max_tokens,
        "batch_size": args.batch_size, "hidden": args.hidden, "threads": torch.get_num_threads(), "packed_attn": attn,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
