"""Pure parts of inference: batching arithmetic, time-budget decisions, submission arithmetic and files."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference import batching, budget
from inference.submission import (HEADER, ensemble, resolve_prior, sanitize, softmax, tta_average,
                                  validate_submission, write_submission)

lengths_st = st.lists(st.integers(1, 3000), min_size=1, max_size=200)


# -- batching ---------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(lengths_st, st.integers(64, 20000), st.integers(1, 64))
def test_token_budget_batches_cover_rows_once_longest_first_within_budget(lengths, budget_tokens, max_rows):
    batches = batching.token_budget_batches(lengths, budget_tokens, max_rows)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for b in batches:
        assert 1 <= len(b) <= max_rows
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget_tokens


def test_take_batch_counts_tta_sequences():
    assert batching.take_batch([100, 90, 80, 50], 400, 64) == 4
    assert batching.take_batch([100, 90, 80, 50], 400, 64, seqs_per_row=2) == 2
    assert batching.take_batch([5000], 400, 64) == 1  # an over-long row still runs, alone
    assert batching.take_batch([], 400, 64) == 0


@settings(max_examples=40, deadline=None)
@given(lengths_st, st.integers(1, 16))
def test_sorted_batches_pad_no_more_than_fixed_batches(lengths, size):
    ours = batching.token_budget_batches(lengths, size * max(lengths), size)
    fixed = batching.fixed_batches(len(lengths), size)
    # sorted chunks are optimal up to where the one short batch falls (at most size-1 rows padded to the max)
    slack = (size - 1) * max(lengths)
    assert batching.padded_tokens(ours, lengths) <= batching.padded_tokens(fixed, lengths) + slack


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.1, 1000), min_size=1, max_size=100), st.integers(1, 4))
def test_lpt_split_is_a_partition_within_one_job_of_the_mean(costs, workers):
    parts = batching.lpt_split(costs, workers)
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) <= sum(costs) / workers + max(costs) + 1e-9
    assert batching.makespan(costs, workers) == pytest.approx(max(loads))


def test_cost_model_from_config_counts_matmuls_not_embeddings():
    from tests.conftest import tiny_llama_config

    small = batching.CostModel.from_config(tiny_llama_config(1024))
    big_vocab = batching.CostModel.from_config(tiny_llama_config(128256))
    assert small == big_vocab  # embedding lookups cost no FLOPs
    # llama tiny: 2 layers x (64*(2*64 + 2*32) + 3*64*128)
    assert small.params == 2 * (64 * (2 * 64 + 2 * 32) + 3 * 64 * 128)
    f = small.flops(np.array([10, 100, 1000]))
    assert np.all(np.diff(f) > 0) and f[2] > 10 * f[1]  # attention makes it super-linear


# -- budget -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,seconds", [("8h30m", 30600), ("90m", 5400), ("45s", 45), ("1h", 3600), ("3600", 3600),
                                          ("1.5h", 5400), ("2m30s", 150), (120, 120.0)])
def test_parse_duration(text, seconds):
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["none", None, "0", ""])
def test_parse_duration_no_limit(text):
    assert budget.parse_duration(text) is None


@pytest.mark.parametrize("text", ["8x", "h", "1h30", "ten minutes", "-5m"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="time budget"):
        budget.parse_duration(text)


def test_ladder_goes_to_shorter_lengths():
    modes = budget.ladder()
    assert modes[0] == budget.Mode() and modes[0].length(2048) == 2048
    assert [m.fraction for m in modes] == sorted([m.fraction for m in modes], reverse=True)
    assert budget.Mode(0.5).length(2048) == 1024
    assert budget.Mode(0.25).length(256) == 128  # never below the floor
    assert budget.Mode(0.25).length(100) == 100  # nor above the model's own length


def test_choose_mode_picks_least_degraded_that_fits():
    modes = budget.ladder()
    cost = {m: 100.0 * m.fraction for m in modes}.__getitem__
    # rate 1/s: 100 s at full length, 75 at 0.75, 50 at 0.5, 37.5 at 0.375
    assert budget.choose_mode(modes, 0, cost, 1.0, 150.0)[0] == 0
    assert budget.choose_mode(modes, 0, cost, 1.0, 80.0)[0] == 1
    assert budget.choose_mode(modes, 0, cost, 1.0, 60.0)[0] == 2
    assert budget.choose_mode(modes, 0, cost, 1.0, 60.0, extra_seconds=20.0)[0] == 3  # a model load ahead
    assert budget.choose_mode(modes, 2, cost, 1.0, 1000.0)[0] == 2  # never upgrades
    assert budget.choose_mode(modes, 0, cost, 1.0, 1.0)[0] == len(modes) - 1  # nothing fits: cheapest, then prior
    assert budget.choose_mode(modes, 0, cost, None, 1.0) == (0, None)  # not measured yet


def test_throughput_combined_rate():
    a, b, c = budget.Throughput(), budget.Throughput(), budget.Throughput()
    a.add(100, 1.0)
    b.add(300, 1.0)
    assert budget.combined_rate([a, b, c], alive=2) == pytest.approx(400)
    assert budget.combined_rate([a, b, c], alive=1) == pytest.approx(200)  # a worker died
    assert budget.combined_rate([c], alive=2) is None


def test_reserve_seconds_bounds():
    assert budget.reserve_seconds(10) == 2.0
    assert budget.reserve_seconds(3600) == 72.0
    assert budget.reserve_seconds(9 * 3600) == 120.0


# -- submission arithmetic --------------------------------------------------------------------------------------
def test_resolve_prior():
    assert np.allclose(resolve_prior([None, None]), 1 / 3)
    assert np.allclose(resolve_prior([[0.4, 0.4, 0.2]]), [0.4, 0.4, 0.2])
    assert np.allclose(resolve_prior([[2, 2, 1], None, [0.2, 0.4, 0.4]], [0.5, 0.3, 0.5]), [0.3, 0.4, 0.3])
    with pytest.raises(ValueError, match="prior"):
        resolve_prior([[0.5, 0.5]])


def test_softmax_temperature_flattens():
    logits = np.array([[2.0, 0.0, -1.0]])
    p1, p2 = softmax(logits), softmax(logits, 2.0)
    assert np.allclose(p1.sum(), 1) and np.allclose(p2.sum(), 1)
    assert p2[0, 0] < p1[0, 0] and np.allclose(p2, softmax(logits / 2))


def test_tta_average_is_swap_symmetric():
    rng = np.random.default_rng(0)
    f_x, f_sx = rng.dirichlet([1, 1, 1], 5), rng.dirichlet([1, 1, 1], 5)
    p_x, p_sx = tta_average(f_x, f_sx), tta_average(f_sx, f_x)
    assert np.allclose(p_x[:, 0], p_sx[:, 1]) and np.allclose(p_x[:, 2], p_sx[:, 2])


def test_ensemble_renormalises_over_models_that_predicted():
    prior = np.array([0.3, 0.3, 0.4])
    p1 = np.array([[0.6, 0.2, 0.2], [np.nan] * 3, [np.nan] * 3])
    p2 = np.array([[0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [np.nan] * 3])
    out = ensemble([p1, p2], [0.75, 0.25], prior)
    assert np.allclose(out[0], [0.5, 0.3, 0.2])
    assert np.allclose(out[1], [0.1, 0.1, 0.8])
    assert np.allclose(out[2], prior)


def test_sanitize_replaces_invalid_rows():
    prior = np.array([0.3, 0.3, 0.4])
    p = np.array([[0.2, 0.2, 0.6], [np.inf, 0, 0], [-0.1, 0.5, 0.6], [0, 0, 0], [2, 1, 1]])
    out, bad = sanitize(p, prior)
    assert bad.tolist() == [False, True, True, True, False]
    assert np.allclose(out.sum(axis=1), 1) and np.allclose(out[4], [0.5, 0.25, 0.25])


def test_write_and_validate_submission(tmp_path):
    ids = [5, 3, 9]
    prior = np.full(3, 1 / 3)
    path = tmp_path / "sub" / "submission.csv"
    bad = write_submission(path, ids, np.array([[0.2, 0.3, 0.5], [np.nan, 1, 1], [1, 1, 1]]), prior)
    assert bad.tolist() == [False, True, False]
    assert validate_submission(path, ids) == []
    assert path.read_text().splitlines()[0] == ",".join(HEADER)
    assert [line.split(",")[0] for line in path.read_text().splitlines()[1:]] == ["5", "3", "9"]
    assert not list(path.parent.glob(".*tmp"))  # no temporary file left behind
    assert validate_submission(path, [3, 5, 9])  # wrong order
    path.write_text("id,a,b,c\n5,1,0,0\n")
    assert "header" in validate_submission(path, [5])[0]
    path.write_text(",".join(HEADER) + "\n5,0.5,0.5,0.5\n")
    assert "not a probability row" in validate_submission(path, [5])[0]
