"""Packing: many examples per micro-batch in one row without padding, with the same work on every rank.

Why: Arena rows are long-tailed (Llama 3 tokens: mean ~680, median ~540, p99 ~3600). A random batch of 8 padded to its
longest row is ~44% real tokens, padded to max_length ~31%. Packing concatenates examples into one row of at most
`max_tokens` tokens, so every computed token is real and a micro-batch never needs more memory than `max_tokens`
tokens. Attention stays block-diagonal, so an example's logits are those of the example run alone:

- GPU: flash-attention 2 varlen (`attn_implementation="flash_attention_2"`; Gemma2 soft-capping needs
  flash-attn >= 2.6), fed with `cu_seqlens` / `max_seqlen` from the collator (`packed_forward_kwargs`), so there is
  no device sync per layer.
- CPU / no flash-attn: transformers 5 detects position_ids that restart at 0 when `attention_mask=None` and
  `use_cache=False` and builds the block-diagonal mask itself (sdpa for Llama, eager for Gemma2, sliding window kept).
  Exact, but it computes all T^2 scores of the row. `arena_varlen` (`register_varlen_attention`) is the CPU twin of
  the flash path: same cu_seqlens kwargs through the same transformers code, attention example by example.

Layout of an epoch (`epoch_layout`), computed identically on every rank from (seed, epoch), so there is no collective:
  1. shuffle the indices;
  2. cut them into mega-batches worth about `mega_batch_steps` steps of `max_tokens` on every rank;
  3. inside a mega-batch, sort by length (longest first) and deal each example to the bin with the fewest tokens, with a
     number of bins that is a multiple of the number of ranks (`deal_into_bins`). Unlike first-fit-decreasing, which
     fills bins to the brim and leaves a light last one (a rank that idles), dealing gives bins whose token totals
     differ by at most one example's length; the long examples are dealt first, one per bin, so attention cost (sum of
     squared lengths) is balanced as well;
  4. group bins of similar cost (tokens + attention) into steps of one bin per rank, shuffle the steps, and assign
     the bins of a step to ranks at random.

A mega-batch too small to give every rank a bin is merged into its neighbour; only an epoch that cannot be laid out at
all (e.g. every example longer than max_tokens / 2 and their count not a multiple of the ranks) is an error, raised at
construction. An example longer than `max_tokens` is an error at construction (it names the index): the data is
truncated to `max_length`, so `max_tokens >= max_length` is a configuration error, never fixed by dropping rows.
"""
from __future__ import annotations

import functools
import heapq
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .batching import soft_targets

# --------------------------------------------------------------------------------------------------------- bin packing


def deal_into_bins(lengths: Sequence[int], n_bins: int, max_tokens: int) -> list[list[int]] | None:
    """Deal items (positions into `lengths`) longest first, each to the bin holding the fewest tokens.

    Returns `n_bins` non-empty bins, or None when that is impossible this way (fewer items than bins, or an item that
    does not fit the emptiest bin, hence no bin). Ties go to the lowest bin number, so the result is deterministic.
    """
    if len(lengths) < n_bins:
        return None
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their (shuffled) order
    heap = [(0, b) for b in range(n_bins)]
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for i in order:
        load, b = heapq.heappop(heap)
        if load + lengths[i] > max_tokens:
            return None
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return bins


def pack_group(lengths: Sequence[int], max_tokens: int, multiple: int = 1) -> list[list[int]] | None:
    """Fewest bins (a multiple of `multiple`, one per rank and step) that `deal_into_bins` manages; None if none."""
    total = int(sum(lengths))
    n = multiple * max(1, math.ceil(total / (multiple * max_tokens)))
    while n <= len(lengths):
        bins = deal_into_bins(lengths, n, max_tokens)
        if bins is not None:
            return bins
        n += multiple
    return None


def first_fit_decreasing(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Classic FFD (the bin-count yardstick in tests and benchmarks; the sampler deals instead, see module doc)."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def split_mega_batches(order: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Cut `order` into consecutive groups of at most `budget` tokens (a longer single item makes its own group)."""
    groups: list[list[int]] = []
    cur: list[int] = []
    tokens = 0
    for i in order:
        if cur and tokens + lengths[i] > budget:
            groups.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += lengths[i]
    if cur:
        groups.append(cur)
    return groups


def pack_mega_batches(groups: list[list[int]], lengths: Sequence[int], max_tokens: int,
                      multiple: int) -> list[list[list[int]]]:
    """Pack each group (dataset indices) into bins; a group that cannot fill a multiple of `multiple` bins (too few
    examples) is merged into the next group, or into the previous ones at the end. Returns bins per packed group.
    Raises ValueError when even the whole epoch cannot be packed."""
    packed: list[tuple[list[int], list[list[int]]]] = []
    pending: list[int] = []
    for group in groups:
        group = pending + group
        bins = pack_group([lengths[i] for i in group], max_tokens, multiple)
        pending = group if bins is None else []
        if bins is not None:
            packed.append((group, bins))
    while pending:
        if not packed:
            raise ValueError(
                f"cannot split {len(pending)} examples into micro-batches of <= {max_tokens} tokens with the same "
                f"number on each of {multiple} ranks; raise max_tokens (>= 2x max_length packs) or use fewer ranks")
        group = packed.pop()[0] + pending
        bins = pack_group([lengths[i] for i in group], max_tokens, multiple)
        pending = group if bins is None else []
        if bins is not None:
            packed.append((group, bins))
    return [[[group[p] for p in b] for b in bins] for group, bins in packed]


def bin_cost(bin_: Sequence[int], lengths: Sequence[int], attn_cost_scale: float) -> float:
    """Work of a micro-batch in token units: tokens (linear layers) + sum of squared lengths / scale (attention)."""
    return float(sum(lengths[i] + lengths[i] ** 2 / attn_cost_scale for i in bin_))


def steps_from_bins(bins: list[list[int]], lengths: Sequence[int], num_replicas: int,
                    attn_cost_scale: float = 4096.0) -> list[list[list[int]]]:
    """Group bins of similar cost (`bin_cost`) into steps of `num_replicas` bins (len(bins) is a multiple of it).

    Dealing already equalises token totals within a mega-batch; grouping by cost then also evens out attention work
    where bins hold few examples (max_tokens close to max_length).
    """
    ranked = sorted(bins, key=lambda b: -bin_cost(b, lengths, attn_cost_scale))
    return [ranked[s : s + num_replicas] for s in range(0, len(ranked), num_replicas)]


def epoch_layout(lengths: Sequence[int], max_tokens: int, num_replicas: int, seed: int, epoch: int, *,
                 shuffle: bool = True, mega_batch_steps: int = 16, fill: float = 0.98,
                 attn_cost_scale: float = 4096.0) -> list[list[list[int]]]:
    """The whole epoch for all ranks: steps[s][rank] = dataset indices of that rank's micro-batch at step s.

    A pure function of its arguments. `fill` < 1 leaves headroom so that dealing a mega-batch into
    `mega_batch_steps * num_replicas` bins of `max_tokens` succeeds; when it does not, that mega-batch gets a step more.
    `attn_cost_scale`: the length at which an example's attention is weighted as much as its linear layers (generous
    for 8B models, where it is nearer 30k; measured on the real sample it keeps token totals within a few percent
    while evening out attention work).
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    order = rng.permutation(n).tolist() if shuffle else list(range(n))
    budget = max(1, int(mega_batch_steps * num_replicas * max_tokens * fill))
    steps: list[list[list[int]]] = []
    for bins in pack_mega_batches(split_mega_batches(order, lengths, budget), lengths, max_tokens, num_replicas):
        steps += steps_from_bins(bins, lengths, num_replicas, attn_cost_scale)
    if shuffle:
        steps = [steps[s] for s in rng.permutation(len(steps))]
        steps = [[step[r] for r in rng.permutation(num_replicas)] for step in steps]
    return steps


# ------------------------------------------------------------------------------------------------------------- sampler


class PackedBatchSampler:
    """Yields, for this rank, lists of dataset indices whose lengths sum to at most `max_tokens` (a batch_sampler).

    Every rank computes the same epoch layout (see module doc), takes its own column and thus gets the same number of
    steps with nearly equal token totals; every example appears once per epoch across all ranks. `len()` is the
    number of steps of the current epoch (the same on every rank, computed locally: no collective); it can differ by
    a step or so between epochs, as the shuffle changes how well mega-batches pack.

    Position: `state_dict()` / `load_state_dict()` save and restore (epoch, step). The step counts the batches yielded,
    which equals the batches consumed with a DataLoader of num_workers=0; with worker prefetch pass the consumed count,
    `state_dict(step=k)`. `set_epoch(e)` starts epoch e, except that it keeps the restored position when the sampler is
    already inside epoch e, so a resumed `for epoch ...: sampler.set_epoch(epoch)` loop continues where it stopped. A
    completed pass moves to the start of the next epoch.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, mega_batch_steps: int = 16, fill: float = 0.98, attn_cost_scale: float = 4096.0):
        self.lengths = [int(x) for x in lengths]
        self.max_tokens = int(max_tokens)
        self.num_replicas, self.rank, self.seed, self.shuffle = int(num_replicas), int(rank), int(seed), shuffle
        self.mega_batch_steps, self.fill = int(mega_batch_steps), float(fill)
        self.attn_cost_scale = float(attn_cost_scale)
        self._validate()
        # The whole epoch as one mega-batch is the last resort of pack_mega_batches: check now that it exists.
        pack_mega_batches([list(range(len(self.lengths)))], self.lengths, self.max_tokens, self.num_replicas)
        self.epoch, self.step = 0, 0
        self._cache: tuple[int, list[list[list[int]]]] | None = None

    def _validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        if not 0 < self.fill <= 1 or self.mega_batch_steps < 1:
            raise ValueError(f"need 0 < fill <= 1 and mega_batch_steps >= 1, got {self.fill}, {self.mega_batch_steps}")
        if len(self.lengths) < self.num_replicas:
            raise ValueError(
                f"{len(self.lengths)} examples cannot give each of {self.num_replicas} ranks a micro-batch")
        for i, n in enumerate(self.lengths):
            if not 1 <= n <= self.max_tokens:
                raise ValueError(f"example {i} has {n} tokens, outside [1, max_tokens={self.max_tokens}]: "
                                 f"set max_tokens >= the format's max_length so every example fits a micro-batch")

    def layout(self, epoch: int | None = None) -> list[list[list[int]]]:
        """steps[s][rank] for an epoch (default: the current one), cached for the current epoch."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            steps = epoch_layout(self.lengths, self.max_tokens, self.num_replicas, self.seed, epoch,
                                 shuffle=self.shuffle, mega_batch_steps=self.mega_batch_steps, fill=self.fill,
                                 attn_cost_scale=self.attn_cost_scale)
            if epoch != self.epoch:
                return steps
            self._cache = (epoch, steps)
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.layout())

    def examples_in_step(self, step: int) -> int:
        """Examples in a step of the current epoch summed over all ranks (exact loss normalisation, no collective)."""
        return sum(len(b) for b in self.layout()[step])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.step = int(epoch), 0

    def __iter__(self) -> Iterator[list[int]]:
        steps = self.layout()
        while self.step < len(steps):
            batch = steps[self.step][self.rank]
            self.step += 1
            yield list(batch)
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self, step: int | None = None) -> dict[str, Any]:
        epoch, step = self.epoch, self.step if step is None else int(step)
        if step >= len(self):  # the epoch is complete: resume at the start of the next one
            epoch, step = epoch + 1, 0
        return {"epoch": epoch, "step": step, "seed": self.seed, "num_replicas": self.num_replicas,
                "max_tokens": self.max_tokens, "num_examples": len(self.lengths)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position. Raises ValueError if the data order would differ (other seed, world size, data)."""
        for key, mine in (("seed", self.seed), ("num_replicas", self.num_replicas), ("max_tokens", self.max_tokens),
                          ("num_examples", len(self.lengths))):
            if state[key] != mine:
                raise ValueError(f"cannot resume the packed sampler: checkpoint has {key}={state[key]}, this run "
                                 f"{mine}; the data order would differ")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


# ------------------------------------------------------------------------------------------------------------ collator


def cu_seqlens_for(lengths: Sequence[int]) -> np.ndarray:
    """Cumulative boundaries [0, l0, l0+l1, ...] (int32, as flash-attention's varlen kernels want)."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def position_ids_for(lengths: Sequence[int]) -> np.ndarray:
    """Positions restarting at 0 for each example: [0..l0-1, 0..l1-1, ...]."""
    starts = np.repeat(cu_seqlens_for(lengths)[:-1].astype(np.int64), lengths)
    return np.arange(int(sum(lengths)), dtype=np.int64) - starts


def last_token_index(lengths: Sequence[int]) -> np.ndarray:
    """Position of each example's last token in the packed row (the token a decoder classifier pools)."""
    return cu_seqlens_for(lengths)[1:].astype(np.int64) - 1


def collate_packed(features: Sequence[dict[str, Any]], input_key: str = "input_ids",
                   label_key: str = "label") -> dict[str, Any]:
    """One packed row from dataset rows: input_ids / position_ids (1, T), cu_seqlens (N+1,) int32, max_seqlen (int),
    pool_index (N,), labels (N,) (-1 where a row has no label), soft (N, 3) / soft_mask (N,) (data.batching.soft_targets),
    num_examples (int)."""
    if not features:
        raise ValueError("collate_packed got an empty micro-batch")
    ids = [np.asarray(f[input_key], dtype=np.int64) for f in features]
    lengths = [len(x) for x in ids]
    if min(lengths) < 1:
        raise ValueError("collate_packed got an example with no tokens")
    labels = [int(f[label_key]) if f.get(label_key) is not None else -1 for f in features]
    return {
        "input_ids": torch.from_numpy(np.concatenate(ids)).unsqueeze(0),
        "position_ids": torch.from_numpy(position_ids_for(lengths)).unsqueeze(0),
        "cu_seqlens": torch.from_numpy(cu_seqlens_for(lengths)),
        "max_seqlen": max(lengths),
        "pool_index": torch.from_numpy(last_token_index(lengths)),
        "labels": torch.tensor(labels, dtype=torch.long),
        "num_examples": len(features),
        **soft_targets(features),
    }


# ------------------------------------------------------------------------------------------------ model inputs, loss

FLASH_IMPLEMENTATIONS = {"flash_attention_2", "flash_attention_3"}
VARLEN_CPU = "arena_varlen"  # registered by `register_varlen_attention`: the CPU twin of the flash varlen path
VARLEN_IMPLEMENTATIONS = FLASH_IMPLEMENTATIONS | {VARLEN_CPU}  # fed cu_seqlens by `packed_forward_kwargs`
MASKED_IMPLEMENTATIONS = {"eager", "sdpa"}  # flex_attention: no CPU backward, wrong packed results (PLATFORM.md)


def attn_implementation_of(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None) or model.backbone.config
    return getattr(config, "_attn_implementation", None) or "eager"


def check_packed_attention(attn_implementation: str, model_type: str = "") -> None:
    """Raise if this attention cannot keep packed examples apart (or cannot run here); names the fix."""
    if attn_implementation in FLASH_IMPLEMENTATIONS:
        try:
            import flash_attn
        except ImportError as e:
            raise ImportError("packing with flash attention needs flash-attn: pip install 'arena-pref[gpu]'") from e
        version = tuple(int(p) for p in flash_attn.__version__.split(".")[:2])
        if model_type == "gemma2" and version < (2, 6):  # softcap arrived in flash-attn 2.6
            raise ImportError(f"Gemma2 soft-capping needs flash-attn >= 2.6, found {flash_attn.__version__}")
        return
    if attn_implementation == VARLEN_CPU:
        register_varlen_attention()
        return
    if attn_implementation not in MASKED_IMPLEMENTATIONS:
        raise ValueError(f"packed batches need attn_implementation in "
                         f"{sorted(MASKED_IMPLEMENTATIONS | VARLEN_IMPLEMENTATIONS)}, got {attn_implementation!r}")
    if attn_implementation == "sdpa" and model_type == "gemma2":
        raise ValueError("Gemma2 needs eager attention without flash-attn (sdpa cannot soft-cap)")


def packed_attn_implementation(model_type: str, device: str = "cpu") -> str:
    """Attention for packed training: flash-attention 2 on an Ampere+ GPU with flash-attn installed (>= 2.6 for
    Gemma2), else the CPU varlen twin (registered here). Pass the result to from_pretrained / from_config."""
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        try:
            check_packed_attention("flash_attention_2", model_type)
            return "flash_attention_2"
        except ImportError:
            pass
    if device.startswith("cuda"):
        import warnings

        warnings.warn("packing on a GPU without flash-attention 2 (needs Ampere+ and pip install 'arena-pref[gpu]'): "
                      "falling back to the exact but slow per-example CPU twin (arena_varlen); set "
                      "model.attn_implementation=sdpa (eager for Gemma2) or data.packing=false", stacklevel=2)
    return register_varlen_attention()


def packed_forward_kwargs(batch: dict[str, Any], attn_implementation: str) -> dict[str, Any]:
    """Keyword arguments of `ArenaClassifier.forward` for a packed batch (tensors already on the model's device).

    Switch: with flash attention (and its CPU twin), pass the collator's cu_seqlens / max_seqlen so transformers calls
    the varlen kernel directly (otherwise it re-derives them from position_ids in every layer, with a device sync for
    max_seqlen). With eager / sdpa, position_ids alone make transformers build the block-diagonal mask.
    """
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "pool_index": batch["pool_index"]}
    if attn_implementation in VARLEN_IMPLEMENTATIONS:
        cu = batch["cu_seqlens"].to(device=batch["input_ids"].device, dtype=torch.int32)
        m = int(batch["max_seqlen"])
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
    return kwargs


# ----------------------------------------------------------------------------------------- CPU varlen attention
# transformers' masked path (eager / sdpa) is exact for packed rows, but it builds a (T, T) mask and computes all
# T^2 scores of the row: at max_tokens = 8 x max_length that is ~8x the attention work of the examples themselves and
# makes packing slower than padding on the CPU. Like flash-attention varlen, this runs attention example by example
# (sum of l^2), fed with the same cu_seqlens kwargs through the same transformers code path, so the CPU tests exercise
# what the GPU path receives.


def _segment_attention(module, q, k, v, dropout: float, scaling: float | None, sliding_window: int | None,
                       softcap: float | None) -> torch.Tensor:
    """Causal attention of one sequence: q (1, heads, n, dim), k / v (1, kv_heads, n, dim) -> (1, n, heads, dim)."""
    groups = q.shape[1] // k.shape[1]
    if softcap is None and sliding_window is None:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=groups > 1).transpose(1, 2)
    # Gemma2: soft-capping (and the sliding window) need the explicit scores, as in transformers' eager attention
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(2, 3)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(q.shape[2], device=q.device)
    allowed = pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        allowed &= pos[None, :] > pos[:, None] - sliding_window  # transformers' sliding_window_overlay
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return (probs @ v).transpose(1, 2)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, cu_seq_lens_q=None, position_ids=None, **kwargs):
    """transformers attention function (query (batch, heads, T, dim)): causal attention within each sequence only.

    Packed row: boundaries from cu_seq_lens_q (the collator's cu_seqlens), else from position_ids restarting at 0.
    Padded batch: `attention_mask` is the (batch, T) keep-mask that transformers' flash mask builder hands over (see
    `register_varlen_attention`); each row attends among its real tokens, as flash-attention's unpadding does.
    """
    attend = functools.partial(_segment_attention, module, dropout=dropout, scaling=scaling,
                               sliding_window=sliding_window, softcap=softcap)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"{VARLEN_CPU} attention takes a (batch, T) padding mask, got {attention_mask.dim()}D")
        out = query.new_zeros(query.shape).transpose(1, 2).contiguous()  # pad positions: 0, never pooled
        for b in range(query.shape[0]):
            keep = attention_mask[b].nonzero().flatten()
            out[b, keep] = attend(query[b : b + 1, :, keep], key[b : b + 1, :, keep], value[b : b + 1, :, keep])[0]
        return out, None
    if query.shape[0] == 1 and cu_seq_lens_q is not None:
        bounds = cu_seq_lens_q.tolist()
    elif query.shape[0] == 1 and position_ids is not None:
        starts = torch.nonzero(position_ids.reshape(-1) == 0).flatten().tolist()
        bounds = (starts if starts and starts[0] == 0 else [0, *starts]) + [query.shape[2]]
    else:  # rows without padding, one sequence each
        bounds = [0, query.shape[2]]
    outs = [attend(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]) for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1), None


def register_varlen_attention() -> str:
    """Register the varlen attention with transformers (idempotent); returns its attn_implementation name.

    Its mask builder is flash-attention's: None for packed rows (no (T, T) mask is ever built) and the 2D padding
    mask for padded batches, so a model using it also evaluates padded batches exactly.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN_CPU, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_CPU, flash_attention_mask)
    return VARLEN_CPU


def packed_loss(logits: torch.Tensor, labels: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """Sum of per-example cross-entropies divided by `denominator` (default: the examples here, i.e. the mean).

    Micro-batches hold different numbers of examples; to weight every example equally across ranks and accumulation
    steps, pass the examples of the whole optimizer step times the gradient-averaging factor (e.g. world size when
    DeepSpeed averages over ranks): `sampler.examples_in_step(s) / world_size` for one micro-batch per step.
    """
    losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return losses.sum() / (len(labels) if denominator is None else denominator)
