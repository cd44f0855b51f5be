"""Soft targets: soft rows in competition files, data.soft_labels joined by id, the distillation loss, soft batches."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.reading import SWAP_CLASSES, DataError, read_battles, swap
from tests.conftest import ROOT
from tests.test_reading import _row, _write
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
    assert str(e.value) == (f"{p}: line 3: id 7: column winner_model_a+winner_model_b+winner_tie: "
                            "probabilities sum to 0.9, not 1 (tolerance 0.0001)")
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


# ------------------------------------------------------------------------------------------------ training runs


def _soft_run_files(tmp_path):
    """60 hard rows + 40 pseudo-labelled rows (soft only, all leaning to A: a pattern a model learns in a few steps),
    and a soft-labels file covering half of the hard rows."""
    import pandas as pd

    from data.synthetic import make_rows, write_sample

    train = pd.read_csv(write_sample(tmp_path / "data", rows=60, seed=3, test_rows=3)["train"])
    pseudo = pd.DataFrame(make_rows(40, seed=5))
    pseudo["id"] += 10_000_000
    for col, p in (("winner_model_a", 0.9), ("winner_model_b", 0.05), ("winner_tie", 0.05)):
        pseudo[col] = p
    both = tmp_path / "train_plus_pseudo.csv"
    pd.concat([train, pseudo], ignore_index=True).to_csv(both, index=False)
    oof = tmp_path / "oof.csv"
    half = train["id"].head(30).tolist() + [99999991, 99999992]  # two ids the training file does not have
    pd.DataFrame({"id": half, "winner_model_a": 0.5, "winner_model_b": 0.3, "winner_tie": 0.2}).to_csv(oof, index=False)
    return both, oof


def _tiny_run(tok_dir, out, csv, *overrides, zero3: bool = False):
    """One tiny training run: a plain ZeRO-2 process, or 2 processes under torchrun with ZeRO-3."""
    from tests.test_training_distributed import _env, single_cmd, torchrun_cmd

    args = ["--config", "configs/tiny/llama_cpu.yaml", f"output_dir={out}",
            f"data.train_csv={csv}", f"data.tokenizer={tok_dir}", "data.format.max_length=64",
            "data.micro_batch_size=8", "model.tiny.num_hidden_layers=1", "model.tiny.hidden_size=32",
            "model.tiny.intermediate_size=64", "model.gradient_checkpointing=false",
            "train.save_every=0", "train.eval_every=0", "train.lr=1e-2", *overrides]
    if zero3:
        cmd = torchrun_cmd([*args, "deepspeed.config=configs/deepspeed/zero3.json"])
    else:
        cmd = single_cmd([*args, "deepspeed.config=configs/deepspeed/zero2.json",
                          "deepspeed.param_persistence_threshold=null"])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())


def test_missing_soft_ids_fail_with_one_line_naming_file_ids_and_column(tmp_path, tiny_tokenizer_dir):
    csv, oof = _soft_run_files(tmp_path)
    r = _tiny_run(tiny_tokenizer_dir, tmp_path / "run", csv, f"data.soft_labels={oof}", "train.distill.alpha=0.5")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if x.startswith("arena-train:"))
    assert line.startswith(f"arena-train: data.soft_labels={oof}: column id: ")
    assert "training ids of" in line and "have no soft label (e.g. " in line and "soft_labels_missing=hard" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.distributed
def test_soft_labels_and_pseudo_labelled_rows_train_and_validate_on_hard_labels(tmp_path, tiny_tokenizer_dir):
    """Two processes under ZeRO-3 (partitioned parameters, each rank its own share of hard, soft and soft-only rows)."""
    import json

    import pandas as pd

    csv, oof = _soft_run_files(tmp_path)
    out = tmp_path / "run"
    r = _tiny_run(tiny_tokenizer_dir, out, csv, f"data.soft_labels={oof}", "data.soft_labels_missing=hard",
                  "train.distill.alpha=0.5", "train.distill.cosine=true", "train.lr=3e-3",
                  "train.max_steps=null", "train.epochs=5", "train.warmup_steps=2", "data.valid_fold=0",
                  zero3=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data.soft_labels: " in r.stderr and "2 ids of" in r.stderr  # the soft file's ids not in the training file
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) >= 20 and np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.1, losses
    # validation: fold 0 without its soft-only rows, scored against hard labels
    preds = np.load(out / "val_predictions.npz")
    hard_ids = set(pd.read_csv(csv)["id"].head(60).astype(str))
    assert (preds["labels"] >= 0).all() and set(preds["ids"].astype(str)) <= hard_ids
    info = json.loads((out / "run_info.json").read_text())
    dropped = int(r.stderr.split("rows of validation fold 0 have no hard label")[0].split()[-1]) if \
        "rows of validation fold 0 have no hard label" in r.stderr else 0
    assert info["valid_rows"] == len(preds["ids"]) and info["train_rows"] + info["valid_rows"] + dropped == 100
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    assert abs(sum(info["prior"]) - 1) < 1e-9


def test_rows_with_neither_label_are_refused(sample_dir):
    import datasets

    from training.config import ConfigError, load_config
    from training.inputs import check_soft_coverage

    cfg = load_config(ROOT / "configs/tiny/llama_cpu.yaml", [f"data.train_csv={sample_dir / 'train.csv'}"])
    ok = datasets.Dataset.from_dict({"id": ["1", "2"], "label": [2, -1], "soft": [[-1.0] * 3, [0.2, 0.2, 0.6]]})
    check_soft_coverage(cfg, ok)
    bad = datasets.Dataset.from_dict({"id": ["1", "77"], "label": [2, -1], "soft": [[-1.0] * 3, [-1.0] * 3]})
    with pytest.raises(ConfigError, match=r"column winner_model_a: 1 training rows have neither a hard label nor a "
                                          r"soft one \(e.g. id 77\)"):
        check_soft_coverage(cfg, bad)


def test_sample_label_noise_redraws_labels_and_is_checked(tmp_path):
    import json

    from data.synthetic import make_rows

    def consistent(rows):
        """Share of labels that match the planted signal (the better response's helpful opener; tie: equal quality)."""
        good = lambda cell: any(t and t.startswith(("Certainly!", "Great question!")) for t in json.loads(cell))  # noqa: E731
        truth = [2 if good(r["response_a"]) == good(r["response_b"]) else 0 if good(r["response_a"]) else 1 for r in rows]
        label = [[r["winner_model_a"], r["winner_model_b"], r["winner_tie"]].index(1) for r in rows]
        whole = np.array([None not in json.loads(r["response_a"]) + json.loads(r["response_b"]) for r in rows])
        return np.mean((np.array(truth) == np.array(label))[whole])  # a null turn may hide the opener

    assert consistent(make_rows(300, seed=4, label_noise=0.0)) == 1.0
    assert 0.55 < consistent(make_rows(300, seed=4, label_noise=0.5)) < 0.8  # 1 - 0.5 * 2/3 expected
    r = _data("sample", "--out", str(tmp_path / "s"), "--rows", "10", "--label-noise", "1.5")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--label-noise must be in [0, 1], got 1.5" in r.stderr
