"""Training inputs: tokenizer, tokenized splits, per-rank batch samplers and collators (padded or packed, full swap).

Rank 0 does the one-off work (training a BPE tokenizer, tokenizing into the on-disk cache) while the other ranks
wait at a barrier and then read its result, so N processes never tokenize the same file N times.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from data.reading import SWAP_CLASSES, swap_probs

from .config import RunConfig, pretrained_source
from .distributed import Dist

log = logging.getLogger(__name__)

SWAP_LABEL = SWAP_CLASSES  # label of the A/B-swapped battle: A wins <-> B wins, tie stays


def prepare_tokenizer(cfg: RunConfig, dist: Dist):
    """The run's tokenizer. `train_bpe` trains one from data.train_csv into output_dir/tokenizer (once; reused on
    resume, so a resumed run sees the same ids)."""
    from data.tokenizer import load_tokenizer, train_bpe_tokenizer

    src = cfg.data.tokenizer or pretrained_source(cfg)  # with model.init_from: the export's tokenizer
    if src != "train_bpe":
        return load_tokenizer(src)
    out = Path(cfg.output_dir) / "tokenizer"
    if dist.is_main and not (out / "tokenizer_config.json").exists():
        from data.reading import read_battles

        texts = [t for b in read_battles(cfg.data.train_csv) for t in (*b.prompt, *b.response_a, *b.response_b)]
        tmp = out.with_name(".tokenizer.tmp")
        train_bpe_tokenizer(texts, tmp, vocab_size=cfg.data.bpe_vocab_size)
        tmp.replace(out)
    dist.barrier()
    return load_tokenizer(out)


@dataclass
class Splits:
    train: "object"  # datasets.Dataset with input_ids, swap_input_ids, length, label, id
    valid: "object | None"
    prior: list[float]  # training label frequencies (A, B, tie)


def load_splits(cfg: RunConfig, tokenizer, dist: Dist) -> Splits:
    """Train and validation datasets. Without data.valid_csv, fold data.valid_fold of the training file is held out
    (folds are prompt-grouped, so no prompt appears on both sides)."""
    from data.dataset import tokenized_dataset

    d = cfg.data

    def load(path):
        kw = dict(num_folds=d.num_folds, seed=d.fold_seed, cache_dir=d.cache_dir)
        ds = tokenized_dataset(path, tokenizer, d.format, progress=True, **kw) if dist.is_main else None
        dist.barrier()  # the others read rank 0's cache
        return ds if ds is not None else tokenized_dataset(path, tokenizer, d.format, progress=False, **kw)

    full = attach_soft_labels(cfg, load(d.train_csv))
    labels = np.asarray(full["label"])
    if d.valid_csv:
        train, valid = full, load(d.valid_csv)
        unlabelled = np.flatnonzero(np.asarray(valid["label"]) < 0)
        if len(unlabelled):
            from .config import ConfigError

            raise ConfigError(f"data.valid_csv={d.valid_csv}: column winner_model_a: {len(unlabelled)} validation rows "
                              f"have no hard label (e.g. id {valid['id'][int(unlabelled[0])]}); validation scores "
                              "against hard labels only")
    elif d.valid_fold is not None:
        folds = np.asarray(full["fold"])
        train = full.select(np.flatnonzero(folds != d.valid_fold))
        held = (folds == d.valid_fold)
        # soft-only rows (pseudo-labels) cannot be scored: they leave the held-out fold (and do not train either,
        # which keeps the folds prompt-grouped)
        dropped = int((held & (labels < 0)).sum())
        if dropped:
            log.warning("%d rows of validation fold %d have no hard label (soft only): left out of validation",
                        dropped, d.valid_fold)
        valid = full.select(np.flatnonzero(held & (labels >= 0)))
    else:
        train, valid = full, None
    check_split_sizes(cfg, len(full), train, valid)
    check_soft_coverage(cfg, train)
    return Splits(train=train, valid=valid, prior=class_prior(np.asarray(train["label"]), np.asarray(train["soft"])))


def class_prior(labels: np.ndarray, soft: np.ndarray) -> list[float]:
    """Class frequencies of the training rows: hard labels count one, rows without one add their probabilities."""
    counts = np.bincount(labels[labels >= 0], minlength=3).astype(float)
    counts += soft[labels < 0].clip(min=0).sum(axis=0) if (labels < 0).any() else 0.0
    return (counts / counts.sum()).tolist()


def attach_soft_labels(cfg: RunConfig, full):
    """The dataset with data.soft_labels joined by id into its `soft` column (not cached: a new soft file never
    re-tokenizes). Ids missing from the soft file fail (or train on the hard term with soft_labels_missing=hard)."""
    d = cfg.data
    if not d.soft_labels:
        return full
    from data.soft_labels import join_soft_labels, read_soft_labels

    needed = np.ones(len(full), dtype=bool)
    if d.valid_csv is None and d.valid_fold is not None:
        needed = np.asarray(full["fold"]) != d.valid_fold  # validation rows score on hard labels only
    j = join_soft_labels(full["id"], np.asarray(full["soft"]), read_soft_labels(d.soft_labels), needed)
    if j.missing and d.soft_labels_missing == "error":
        from .config import ConfigError

        raise ConfigError(f"data.soft_labels={d.soft_labels}: column id: {len(j.missing)} training ids of "
                          f"{d.train_csv} have no soft label (e.g. {', '.join(j.missing[:5])}); set "
                          "data.soft_labels_missing=hard to train those rows on their hard label alone")
    log.info("data.soft_labels: %d rows joined, %d training ids without a soft label (%s), %d ids of %s not in %s "
             "(ignored)", j.joined, len(j.missing), "hard term only" if j.missing else "-", j.unused, d.soft_labels,
             d.train_csv)
    return full.remove_columns("soft").add_column("soft", j.soft.tolist())


def check_soft_coverage(cfg: RunConfig, train) -> None:
    """Every training row needs a hard label or a soft target."""
    from .config import ConfigError

    labels, soft = np.asarray(train["label"]), np.asarray(train["soft"])
    none = np.flatnonzero((labels < 0) & (soft[:, 0] < 0))
    if len(none):
        raise ConfigError(f"data.train_csv={cfg.data.train_csv}: column winner_model_a: {len(none)} training rows have "
                          f"neither a hard label nor a soft one (e.g. id {train['id'][int(none[0])]}); give label "
                          "columns or data.soft_labels")


def check_split_sizes(cfg: RunConfig, rows: int, train, valid) -> None:
    """Refuse an empty training set or validation fold before the first step (not after hours of training, when
    the best-model export finds nothing to score)."""
    from .config import ConfigError

    d = cfg.data
    if valid is not None and len(valid) == 0:
        if d.valid_csv:
            raise ConfigError(f"data.valid_csv={d.valid_csv}: the validation file has no rows")
        raise ConfigError(f"data.valid_fold={d.valid_fold}: fold {d.valid_fold} of data.num_folds={d.num_folds} holds "
                          f"no rows of {d.train_csv} ({rows} rows; folds group rows by prompt): use fewer folds, "
                          "another fold, data.valid_csv, or data.valid_fold=null to train without validation")
    if len(train) == 0:
        raise ConfigError(f"data.train_csv={d.train_csv}: no training rows left after holding out fold "
                          f"{d.valid_fold} ({rows} rows in the file)")


def examples_of(ds, indices: list[int], full_swap: bool) -> list[dict]:
    """Collator inputs for dataset rows; with full swap each row is followed by its A/B-swapped twin (label and
    soft target permuted by SWAP_CLASSES)."""
    cols = ds.select_columns(["input_ids", "label"] + (["soft"] if "soft" in ds.column_names else [])
                             + (["swap_input_ids"] if full_swap else []))[indices]
    softs = cols.get("soft") or [None] * len(indices)
    out = []
    for k, (ids, y, q) in enumerate(zip(cols["input_ids"], cols["label"], softs)):
        q = None if q is None or q[0] < 0 else tuple(q)
        out.append({"input_ids": ids, "label": int(y), "soft": q})
        if full_swap:  # the swapped rendering is read only when it is used
            out.append({"input_ids": cols["swap_input_ids"][k], "label": SWAP_LABEL[int(y)] if y >= 0 else -1,
                        "soft": None if q is None else swap_probs(q)})
    return out


def example_lengths(ds, full_swap: bool) -> np.ndarray:
    """Per-row token counts the sampler balances on: a full-swap pair counts both renderings."""
    n = np.asarray(ds["length"], dtype=np.int64)
    if not full_swap:
        return n
    # the swapped rendering has exactly the same length (the truncation plan is symmetric under the A/B swap, a
    # tested property of data.truncation), so there is no need to read the whole swap_input_ids column
    return 2 * n


def make_sampler(cfg: RunConfig, ds, dist: Dist):
    """RandomBatchSampler (padded) or PackedBatchSampler (data.packing), seeded by train.seed."""
    d = cfg.data
    lengths = example_lengths(ds, d.full_swap)
    if d.packing:
        from data.packing import PackedBatchSampler  # imported only when packing is on

        return PackedBatchSampler(lengths, d.max_tokens, num_replicas=dist.world_size, rank=dist.rank,
                                  seed=cfg.train.seed, shuffle=True)
    from data.batching import RandomBatchSampler

    return RandomBatchSampler(lengths, d.micro_batch_size, dist.world_size, dist.rank, seed=cfg.train.seed, shuffle=True)


def make_collate(cfg: RunConfig, pad_id: int) -> Callable[[list[dict]], dict]:
    if cfg.data.packing:
        from data.packing import collate_packed

        return collate_packed
    from data.batching import collate_padded

    return lambda examples: collate_padded(examples, pad_id)


def forward_kwargs(batch: dict, packing: bool, attn_implementation: str) -> dict:
    """The ArenaClassifier.forward() arguments of a collated batch (labels, cu_seqlens... are not model inputs)."""
    if packing:
        from data.packing import packed_forward_kwargs

        return packed_forward_kwargs(batch, attn_implementation)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def micro_batches(sampler, ds, collate, full_swap: bool, world_size: int) -> Iterator[tuple[dict, float]]:
    """Endless stream of (collated micro-batch, loss denominator), epoch after epoch, from the sampler's position.

    The denominator makes the summed per-example loss a mean over the examples of the micro-step on ALL ranks
    (DeepSpeed then averages gradients over ranks): packed micro-batches hold different numbers of examples, and
    each example should weigh the same. Padded micro-batches are equal-sized, so it is their own size.
    """
    per_index = 2 if full_swap else 1
    epoch = sampler.state_dict()["epoch"]
    while True:
        sampler.set_epoch(epoch)
        for indices in sampler:
            if hasattr(sampler, "examples_in_step"):  # packed: counted without a collective (same layout everywhere)
                denom = sampler.examples_in_step(sampler.step - 1) * per_index / world_size
            else:
                denom = len(indices) * per_index
            yield collate(examples_of(ds, indices, full_swap)), float(denom)
        epoch += 1


def eval_shard(n: int, world_size: int, rank: int, lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """This rank's evaluation batches (dataset indices). Every rank gets the same number of batches (ZeRO-3 needs
    every rank in every forward): the last shard is topped up with repeats of index 0, which callers drop by index.
    Rows are sorted by length so that padding is small."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    per_rank = -(-n // world_size)
    padded = np.concatenate([order, np.zeros(per_rank * world_size - n, dtype=order.dtype)])
    mine = padded[rank::world_size][:per_rank]
    return [mine[s : s + batch_size].tolist() for s in range(0, len(mine), batch_size)]
