"""Pure scheduling arithmetic for inference: cost estimates, token-budget batches, splitting work across devices.

Padding is the main waste when scoring heavy-tailed conversations: a batch costs (rows x its longest row), so rows
are sorted longest first and cut into batches under a token budget. Longest first also means the largest batch
(the one most likely to run out of memory) runs first, and greedy longest-processing-time-first scheduling
(Graham's LPT rule) lets several devices finish within about one batch of each other.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """Forward FLOPs of a decoder for one sequence of L tokens: 2*P*L (matmuls) + 4*layers*d_attn*L^2 (attention).

    P counts the parameters that do matmuls per token (embeddings excluded: a lookup costs nothing).
    """

    params: float  # non-embedding parameters
    layers: int
    attn_dim: int  # heads * head_dim (query width)

    def flops(self, length):
        """FLOPs of sequences of the given length(s) (scalar or numpy array)."""
        length = np.asarray(length, dtype=np.float64)
        return 2.0 * self.params * length + 4.0 * self.layers * self.attn_dim * length * length

    @classmethod
    def from_config(cls, config) -> "CostModel":
        """Estimate from an HF config (decoders; encoders are close enough for scheduling)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = cfg.hidden_size
        layers = cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
        q, kv = heads * head_dim, kv_heads * head_dim
        gated = getattr(cfg, "model_type", "") in {"llama", "gemma", "gemma2", "gemma3", "mistral", "qwen2", "qwen3", "phi3"}
        mlp = (3 if gated else 2) * hidden * inter
        per_layer = hidden * (2 * q + 2 * kv) + mlp  # q, o projections are hidden x q; k, v are hidden x kv
        return cls(params=float(layers * per_layer), layers=layers, attn_dim=q)

    @classmethod
    def from_config_file(cls, path) -> "CostModel":
        """From a config.json without importing transformers' model code (multimodal configs: their text part)."""
        import json
        from types import SimpleNamespace

        d = json.loads(open(path, encoding="utf-8").read())
        d = d.get("text_config", d)
        return cls.from_config(SimpleNamespace(**d))


def row_lengths(full_lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Rendered length of each row under a max_length (truncation keeps at most max_length tokens)."""
    return np.minimum(np.asarray(full_lengths, dtype=np.int64), max_length)


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Row indices sorted by length, longest first; ties keep input order (deterministic batches)."""
    lengths = np.asarray(lengths)
    return [int(i) for i in np.argsort(-lengths, kind="stable")]


def take_batch(lengths: Sequence[int], batch_tokens: int, max_rows: int, seqs_per_row: int = 1) -> int:
    """How many rows from the front of a longest-first list make the next batch.

    A padded batch of n rows costs n * seqs_per_row * lengths[0] tokens; take as many as fit in `batch_tokens`
    (at least one, at most `max_rows`). seqs_per_row is 2 with test-time augmentation (each row also swapped).
    """
    if len(lengths) == 0:
        return 0
    longest = max(int(lengths[0]), 1)
    n = batch_tokens // (longest * seqs_per_row)
    return int(max(1, min(n, max_rows, len(lengths))))


def token_budget_batches(lengths: Sequence[int], batch_tokens: int, max_rows: int = 64) -> list[list[int]]:
    """All batches (lists of row indices) of a length-sorted, token-budget schedule, longest rows first."""
    order = longest_first(lengths)
    sorted_len = [int(lengths[i]) for i in order]
    batches, start = [], 0
    while start < len(order):
        n = take_batch(sorted_len[start:], batch_tokens, max_rows)
        batches.append(order[start : start + n])
        start += n
    return batches


def fixed_batches(n_rows: int, batch_size: int) -> list[list[int]]:
    """The naive baseline: consecutive rows in file order, a fixed number per batch."""
    return [list(range(s, min(s + batch_size, n_rows))) for s in range(0, n_rows, batch_size)]


def padded_tokens(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> int:
    """Tokens actually computed by padded batches (each row padded to its batch's longest)."""
    return int(sum(len(b) * max(int(lengths[i]) for i in b) for b in batches if b))


def lpt_split(costs: Sequence[float], n_workers: int) -> list[list[int]]:
    """Greedy longest-processing-time-first assignment of jobs to workers (each list stays longest first).

    The finish time is within max(cost) of the optimum (and within 4/3 of it); the run-time scheduler in
    predict.py applies the same rule online (the next-longest batch goes to the first idle device).
    """
    if n_workers < 1:
        raise ValueError("need at least one worker")
    heap = [(0.0, w) for w in range(n_workers)]
    out: list[list[int]] = [[] for _ in range(n_workers)]
    for i in longest_first(costs):
        load, w = heapq.heappop(heap)
        out[w].append(i)
        heapq.heappush(heap, (load + float(costs[i]), w))
    return out


def makespan(costs: Sequence[float], n_workers: int) -> float:
    """Finish time of the LPT schedule: the busiest worker's total cost."""
    return max((sum(float(costs[i]) for i in part) for part in lpt_split(costs, n_workers)), default=0.0)
