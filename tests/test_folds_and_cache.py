"""Prompt-grouped stratified folds, and the on-disk tokenization cache."""
import collections

import numpy as np

from data.dataset import tokenized_dataset
from data.folds import assign_folds, prompt_key
from data.reading import Battle, read_battles
from data.template import FormatConfig
from tests.conftest import REAL_TRAIN, needs_shared


def _check_folds(battles, k):
    folds = assign_folds(battles, k, seed=0)
    by_prompt = collections.defaultdict(set)
    for b, f in zip(battles, folds):
        by_prompt[prompt_key(b)].add(int(f))
    assert all(len(s) == 1 for s in by_prompt.values()), "a prompt leaked into two folds"
    assert set(folds) == set(range(k))
    labels = np.array([b.label for b in battles])
    overall = np.bincount(labels, minlength=3) / len(labels)
    for f in range(k):
        share = np.bincount(labels[folds == f], minlength=3) / max(1, (folds == f).sum())
        assert np.abs(share - overall).max() < 0.06
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 0.2 * sizes.mean()
    return folds


def test_folds_group_repeated_prompts(sample_dir):
    battles = read_battles(sample_dir / "train.csv")
    assert len({prompt_key(b) for b in battles}) < len(battles), "the sample repeats prompts"
    folds = _check_folds(battles, 5)
    assert (folds == assign_folds(battles, 5, seed=0)).all()


def test_prompt_key_normalises_whitespace_and_case():
    a = Battle(1, ("Hello   World",), ("x",), ("y",))
    b = Battle(2, ("hello world",), ("z",), ("w",))
    assert prompt_key(a) == prompt_key(b)


@needs_shared
def test_folds_on_real_sample():
    _check_folds(read_battles(REAL_TRAIN), 5)


def test_tokenized_dataset_is_cached(sample_dir, tiny_tokenizer, tmp_path, monkeypatch):
    import data.dataset

    fmt = FormatConfig(max_length=128)
    ds = tokenized_dataset(sample_dir / "train.csv", tiny_tokenizer, fmt, cache_dir=tmp_path, progress=False)
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and not cached[0].name.startswith(".")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the second run must read the cache, not tokenize")

    with monkeypatch.context() as m:
        m.setattr(data.dataset, "build_records", no_tokenizing)
        ds2 = tokenized_dataset(sample_dir / "train.csv", tiny_tokenizer, fmt, cache_dir=tmp_path, progress=False)
    assert ds2["input_ids"] == ds["input_ids"] and len(list(tmp_path.iterdir())) == 1
    assert set(ds.column_names) >= {"id", "input_ids", "swap_input_ids", "length", "label", "fold"}
    assert max(ds["length"]) <= 128 and set(ds["label"]) == {0, 1, 2}
    # a different max_length is a different cache entry
    tokenized_dataset(sample_dir / "train.csv", tiny_tokenizer, FormatConfig(max_length=100), cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2
