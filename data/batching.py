"""Padded micro-batches for data-parallel training: a resumable per-rank batch sampler and a right-padding collator.

Under ZeRO-3 every rank must run the same number of forward passes (each one gathers parameters collectively), so
the sampler drops the incomplete last global batch and computes its length without any collective. Its position
(epoch, step within the epoch) is part of every checkpoint, which is what makes resume exact.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

# Length grouping sorts indices by length inside windows of this many global batches: less padding, still random.
GROUP_WINDOW = 64


class RandomBatchSampler:
    """Yields this rank's micro-batches (lists of dataset indices), epoch after epoch, from a restored position.

    `num_examples_or_lengths`: an int (plain shuffling) or per-example lengths (shuffled, then sorted by length
    inside windows of GROUP_WINDOW global batches, then the batch order shuffled again, so a micro-batch holds
    examples of similar length). Every rank draws the same permutation (seeded by seed + epoch) and takes its own
    slice of each global batch (batch_size * num_replicas examples).
    """

    def __init__(self, num_examples_or_lengths: int | Sequence[int], batch_size: int, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True):
        if isinstance(num_examples_or_lengths, (int, np.integer)):
            self.n, self.lengths = int(num_examples_or_lengths), None
        else:
            self.lengths = np.asarray(num_examples_or_lengths, dtype=np.int64)
            self.n = len(self.lengths)
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size}, num_replicas={num_replicas}, rank={rank}")
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.step = 0, 0
        if len(self) == 0:
            raise ValueError(f"{self.n} examples are fewer than one global batch "
                             f"({batch_size} per rank x {num_replicas} ranks)")

    def __len__(self) -> int:
        """Micro-batches per epoch for each rank (the same on every rank)."""
        return self.n // (self.batch_size * self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All global batches of an epoch (index arrays of batch_size * num_replicas), identical on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        g = self.batch_size * self.num_replicas
        order = order[: len(self) * g]
        if self.lengths is not None:
            window = g * GROUP_WINDOW
            chunks = [order[s : s + window] for s in range(0, len(order), window)]
            # stable sort keeps the shuffled order among equal lengths
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[s : s + g] for s in range(0, len(order), g)]
        if self.lengths is not None and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        while self.step < len(batches):
            b = batches[self.step]
            self.step += 1  # counted when handed out: the loop consumes a batch before it checkpoints
            yield [int(i) for i in b[lo:hi]]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.epoch, self.step = int(d["epoch"]), int(d["step"])


def collate_padded(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids (B, T), attention_mask (B, T), labels (B,) (-1: no hard label), and
    soft (B, 3) / soft_mask (B,) (see `soft_targets`).

    Right padding keeps position ids 0..len-1 for every row without passing position_ids; the classifier pools the
    last real token found from the mask.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    ids, mask = pad_right([e["input_ids"] for e in examples], pad_id)
    labels = torch.tensor([int(e["label"]) if e.get("label") is not None else -1 for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, **soft_targets(examples)}


def soft_targets(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """soft (N, 3) float32 targets and soft_mask (N,) bool from each example's optional "soft" triple (None: no
    soft target, zeros). Shared by the padded and the packed collators."""
    soft = torch.zeros((len(examples), 3), dtype=torch.float32)
    mask = torch.zeros(len(examples), dtype=torch.bool)
    for i, e in enumerate(examples):
        if e.get("soft") is not None:
            soft[i] = torch.as_tensor(e["soft"], dtype=torch.float32)
            mask[i] = True
    return {"soft": soft, "soft_mask": mask}


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of shape (B, longest), right-padded; shared by training and inference."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
