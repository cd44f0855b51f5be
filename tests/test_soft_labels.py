"""Soft targets: soft rows in competition files, data.soft_labels joined by id, the distillation loss, soft batches."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.reading import SWAP_CLASSES, DataError, read_battles, swap
from tests.conftest import ROOT
from tests.test_reading import HEADER, _row, _write
from training.losses import distill_loss, soft_term


def _data(*args):
    return subprocess.run([sys.executable, "-m", "data", *args], capture_output=True, text=True, cwd=ROOT)


# ------------------------------------------------------------------------------------------------ reading


def test_soft_rows_read_as_probabilities_and_one_hot_floats_stay_hard(tmp_path):
    p = _write(tmp_path, _row(1, w=(0.7, 0.2, 0.1)) + _row(2, w=("1.0", "0.0", "0.0")) + _row(3, w=(0, 0, 1)))
    soft, hard, tie = read_battles(p)
    assert soft.label is None and soft.soft == pytest.approx((0.7, 0.2, 0.1))
    assert hard.label == 0 and hard.soft is None and tie.label == 2
    s = swap(soft)
    assert s.soft == pytest.approx((0.2, 0.7, 0.1)) and swap(s) == soft


def test_validate_cli_counts_soft_rows(tmp_path):
    p = _write(tmp_path, _row(1, w=(0.7, 0.2, 0.1)) + _row(2) + _row(3, w=(0.3333333, 0.3333333, 0.3333334)))
    r = _data("validate", str(p))
    assert r.returncode == 0 and f"{p}: OK, 3 rows (2 soft-labelled" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("w, column, msg", [
    ((0.5, 0.3, 0.1), "winner_tie", "must sum to 1, got 0.9"),
    ((-0.1, 0.6, 0.5), "winner_model_a", "not 0/1 or a probability"),
    ((0.5, "nan", 0.5), "winner_model_b", "not 0/1 or a probability"),
    ((1.2, 0, -0.2), "winner_model_a", "not 0/1 or a probability"),
])
def test_bad_soft_rows_name_file_line_id_and_column(tmp_path, w, column, msg):
    p = _write(tmp_path, _row(1) + _row(42, w=w))
    r = _data("validate", str(p))
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert f"{p}: line 3: id 42: column {column}: " in r.stdout and msg in r.stdout, r.stdout


def test_score_refuses_labels_without_hard_labels(tmp_path):
    labels = _write(tmp_path, _row(1) + _row(2, w=(0.6, 0.3, 0.1)))
    sub = tmp_path / "sub.csv"
    sub.write_text("id,winner_model_a,winner_model_b,winner_tie\n1,0.5,0.3,0.2\n2,0.5,0.3,0.2\n")
    r = _data("score", "--submission", str(sub), "--labels", str(labels))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{labels}: id 2: column winner_model_a: no hard label (1 of 2 rows" in r.stderr, r.stderr


def test_soft_rows_stratify_folds_by_their_argmax(sample_dir):
    from data.folds import assign_folds
    from dataclasses import replace

    battles = read_battles(sample_dir / "train.csv")
    soft = [replace(b, label=None, soft=tuple(0.6 if c == b.label else 0.2 for c in range(3))) for b in battles]
    assert (assign_folds(soft, 5, seed=0) == assign_folds(battles, 5, seed=0)).all()


# ------------------------------------------------------------------------------------------------ soft-labels file


def test_soft_labels_file_must_sum_to_one(tmp_path):
    from data.soft_labels import read_soft_labels

    p = tmp_path / "oof.csv"
    p.write_text("id,winner_model_a,winner_model_b,winner_tie\n1,0.5,0.25,0.25\n7,0.5,0.2,0.2\n")
    with pytest.raises(DataError) as e:
        read_soft_labels(p)
    assert str(e.value) == f"{p}: line 3: id 7: column winner_tie: probabilities must sum to 1, got 0.9"
    p.write_text("id,winner_model_a,winner_model_b,winner_tie\n1,0.5,0.25,0.25\n7,0.5,0.2,0.30001\n")
    table = read_soft_labels(p)
    assert set(table) == {"1", "7"} and table["7"].sum() == pytest.approx(1.0, abs=1e-12)


def test_join_soft_labels_counts_missing_and_unused():
    from data.soft_labels import join_soft_labels

    own = np.array([[-1, -1, -1], [0.1, 0.8, 0.1], [-1, -1, -1]], dtype=np.float32)
    table = {"a": np.array([0.2, 0.3, 0.5]), "zz": np.array([1, 0, 0.0])}
    j = join_soft_labels(["a", "b", "c"], own, table, needed=np.array([True, True, False]))
    assert j.joined == 1 and j.missing == ["b"] and j.unused == 1
    np.testing.assert_allclose(j.soft, [[0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [-1, -1, -1]])


def test_class_prior_counts_soft_rows_probabilities():
    from training.inputs import class_prior

    labels = np.array([0, 0, 1, -1])
    soft = np.array([[-1] * 3, [-1] * 3, [-1] * 3, [0.0, 0.5, 0.5]])
    assert class_prior(labels, soft) == pytest.approx([0.5, 0.375, 0.125])


# ------------------------------------------------------------------------------------------------ loss


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, generator=g) * 2
    labels = torch.randint(0, 3, (n,), generator=g)
    soft = torch.softmax(torch.randn(n, 3, generator=g), -1)
    return logits, labels, soft


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_alpha_zero_is_exactly_cross_entropy(smoothing):
    logits, labels, soft = _batch()
    ref = F.cross_entropy(logits, labels, reduction="sum", label_smoothing=smoothing)
    for mask in (None, torch.ones(6, dtype=torch.bool)):
        got = distill_loss(logits, labels, soft, mask, alpha=0.0, temperature=2.0, cosine=True,
                           label_smoothing=smoothing)
        assert torch.equal(got, ref)


def test_soft_term_is_t2_kl_and_zero_at_the_target():
    logits, _, soft = _batch()
    for t in (1.0, 2.0, 4.0):
        p = torch.softmax(logits / t, -1)
        kl = (soft * (soft.log() - p.log())).sum(-1) * t * t
        torch.testing.assert_close(soft_term(logits, soft, t), kl)
        # matching the tempered distribution exactly costs nothing, cosine included
        torch.testing.assert_close(soft_term(logits, p, t, cosine=True), torch.zeros(6), atol=1e-6, rtol=0)
    cos = 1 - F.cosine_similarity(torch.softmax(logits, -1), soft, dim=-1)
    torch.testing.assert_close(soft_term(logits, soft, 1.0, cosine=True), soft_term(logits, soft, 1.0) + cos)


def test_rows_mix_hard_soft_and_both():
    logits, labels, soft = _batch(3)
    labels = torch.tensor([0, -1, 2])  # row 1: pseudo-labelled (soft only)
    mask = torch.tensor([True, True, False])  # row 2: hard only (soft_labels_missing=hard)
    a, t = 0.7, 2.0
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    st = soft_term(logits, soft, t)
    want = (1 - a) * ce[0] + a * st[0] + st[1] + ce[2]
    torch.testing.assert_close(distill_loss(logits, labels, soft, mask, alpha=a, temperature=t), want)
    # alpha does not weigh soft-only rows: the pseudo-labelled row counts fully at alpha=0 too
    torch.testing.assert_close(distill_loss(logits, labels, soft, mask, alpha=0.0, temperature=t), ce[0] + st[1] + ce[2])
    with pytest.raises(ValueError, match="neither a hard label nor a soft target"):
        distill_loss(logits, labels, soft, torch.tensor([True, False, True]), alpha=a)


def test_loss_is_invariant_under_the_ab_swap():
    logits, labels, soft = _batch(8, seed=3)
    perm = list(SWAP_CLASSES)
    mask = torch.tensor([True, False] * 4)
    y = torch.where(torch.arange(8) % 3 == 0, torch.full_like(labels, -1), labels)
    mask = mask | (y < 0)
    ys = torch.tensor([SWAP_CLASSES[int(v)] if v >= 0 else -1 for v in y])
    for cosine in (False, True):
        a = distill_loss(logits, y, soft, mask, alpha=0.5, temperature=3.0, cosine=cosine, label_smoothing=0.1)
        b = distill_loss(logits[:, perm], ys, soft[:, perm], mask, alpha=0.5, temperature=3.0, cosine=cosine,
                         label_smoothing=0.1)
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ batches


def test_full_swap_permutes_soft_targets_in_padded_and_packed_batches():
    import datasets

    from data.batching import collate_padded
    from data.packing import collate_packed
    from training.inputs import examples_of

    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6], [7, 8, 9]], "swap_input_ids": [[6, 5], [9, 8, 7]],
                                     "label": [-1, 1], "soft": [[0.7, 0.2, 0.1], [-1.0, -1.0, -1.0]]})
    ex = examples_of(ds, [0, 1], full_swap=True)
    assert [e["label"] for e in ex] == [-1, -1, 1, 0]
    assert ex[0]["soft"] == pytest.approx((0.7, 0.2, 0.1)) and ex[1]["soft"] == pytest.approx((0.2, 0.7, 0.1))
    assert ex[2]["soft"] is None and ex[3]["soft"] is None
    for batch in (collate_padded(ex, 0), collate_packed(ex)):
        assert batch["soft_mask"].tolist() == [True, True, False, False]
        torch.testing.assert_close(batch["soft"][:2], torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]]))
        assert batch["labels"].tolist() == [-1, -1, 1, 0]


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("override, msg", [
    ("train.distill.alpha=1.5", "train.distill.alpha: must be in [0, 1]"),
    ("train.distill.temperature=0", "train.distill.temperature: must be > 0"),
    ("data.soft_labels_missing=drop", "data.soft_labels_missing: must be error or hard"),
    ("data.soft_labels=/nonexistent/oof.csv", "data.soft_labels: file not found: /nonexistent/oof.csv"),
])
def test_distill_config_is_validated(sample_dir, override, msg):
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        load_config(ROOT / "configs/tiny/llama_cpu.yaml", [f"data.train_csv={sample_dir / 'train.csv'}", override])
