"""Fair truncation: property tests on the pure plan, and rendering with a real tokenizer."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.reading import Battle, swap
from data.template import FormatConfig, Formatter
from data.truncation import Overheads, cut, fair_budgets, min_length, plan_truncation
from tests.conftest import LLAMA3_TOKENIZER, REAL_TRAIN, needs_llama3, needs_shared

O = Overheads(fixed=12, per_turn=9, omitted=6, cut=4)
lengths = st.tuples(st.integers(0, 3000), st.integers(0, 3000), st.integers(0, 3000))
turn_lists = st.lists(lengths, min_size=1, max_size=6)
max_lengths = st.integers(min_length(O), 4096)


def _out_len(plan):
    n = O.fixed + sum(O.per_turn + sum(t.keep) for t in plan.turns)
    return n + (O.omitted if plan.dropped else 0)


@given(turn_lists, max_lengths, st.sampled_from(["last", "first"]))
@settings(max_examples=400, deadline=None)
def test_never_exceeds_max_length(turns, max_length, keep):
    plan = plan_truncation(turns, max_length, O, keep)
    assert _out_len(plan) <= max_length
    for t in plan.turns:
        assert all(0 <= k <= L for k, L in zip(t.keep, turns[t.turn]))
    assert plan.turns, "at least one turn survives"


@given(turn_lists, max_lengths)
@settings(max_examples=300, deadline=None)
def test_nothing_cut_when_it_fits(turns, max_length):
    total = O.fixed + sum(O.per_turn + sum(t) for t in turns)
    plan = plan_truncation(turns, max_length, O)
    if total <= max_length:
        assert [t.keep for t in plan.turns] == [tuple(t) for t in turns] and not plan.dropped
    else:
        assert plan.dropped or any(t.keep != tuple(turns[t.turn]) for t in plan.turns)


@given(lengths, st.integers(0, 6000))
@settings(max_examples=500, deadline=None)
def test_fair_budgets_equal_when_both_responses_overflow(ls, budget):
    kp, ka, kb = fair_budgets(ls, budget)
    assert kp + ka + kb <= budget or (kp, ka, kb) == ls
    if ka < ls[1] and kb < ls[2]:
        assert ka == kb
    # water-filling: no part keeps more than a cut part (up to the 2-token integer remainder given to the prompt)
    keep = (kp, ka, kb)
    for i, k in enumerate(keep):
        if k < ls[i]:
            assert max(keep) <= k + 2
    # little waste: at most 2 tokens unused (integer remainder that cannot be split fairly)
    if sum(ls) > budget:
        assert budget - (kp + ka + kb) <= 2


@given(turn_lists, max_lengths, st.sampled_from(["last", "first"]))
@settings(max_examples=300, deadline=None)
def test_swapped_row_gives_swapped_truncation(turns, max_length, keep):
    plan = plan_truncation(turns, max_length, O, keep)
    swapped = plan_truncation([(p, b, a) for p, a, b in turns], max_length, O, keep)
    assert [t.turn for t in plan.turns] == [t.turn for t in swapped.turns]
    assert [(p, b, a) for p, a, b in (t.keep for t in plan.turns)] == [t.keep for t in swapped.turns]


def test_keeps_most_recent_whole_turns_and_marks_the_drop():
    turns = [(50, 400, 400), (10, 100, 100), (10, 100, 100)]
    plan = plan_truncation(turns, 12 + 2 * (9 + 210) + 6 + 20, O, "last")
    assert [t.turn for t in plan.turns] == [1, 2] and plan.omitted_before and not plan.omitted_after
    first = plan_truncation(turns, 12 + 9 + 850 + 6 + 20, O, "first")
    assert [t.turn for t in first.turns] == [0] and first.omitted_after


def test_partial_turn_uses_leftover_budget():
    turns = [(50, 4000, 4000), (10, 100, 100)]
    plan = plan_truncation(turns, 1000, O, "last", min_partial=32)
    assert [t.turn for t in plan.turns] == [0, 1]
    assert plan.turns[1].keep == (10, 100, 100)
    assert _out_len(plan) == 1000 - (1000 - _out_len(plan))  # consistent
    assert plan.turns[0].keep[1] == plan.turns[0].keep[2] and not plan.dropped


def test_too_small_max_length_is_an_error():
    with pytest.raises(ValueError, match="minimum"):
        plan_truncation([(1, 1, 1)], min_length(O) - 1, O)


def test_cut_head_tail_and_marker():
    ids = list(range(100))
    assert cut(ids, 100, [-1]) == ids
    out = cut(ids, 21, [-1, -2], head_fraction=0.5)
    assert len(out) == 21 and out[:9] == list(range(9)) and out[9:11] == [-1, -2] and out[11:] == list(range(90, 100))
    assert cut(ids, 2, [-1, -2, -3]) == [0, 1]


def _battle(i, turns):
    return Battle(i, tuple(t[0] for t in turns), tuple(t[1] for t in turns), tuple(t[2] for t in turns), label=0)


def test_render_with_tokenizer_respects_budget_and_swap(tiny_tokenizer):
    long = "word " * 600
    b = _battle(1, [("first question " * 30, long, "short answer"), ("second?", long, long + "tail")])
    fmt = FormatConfig(max_length=200)
    f = Formatter(tiny_tokenizer, fmt)
    (ids,) = f.encode([b])
    assert len(ids) <= 200
    assert ids[-len(f.suffix):] == f.suffix and ids[0] == tiny_tokenizer.bos_token_id
    (sw,) = f.encode([swap(b)])
    (sw2,) = f.encode([b], swap=True)
    assert sw == sw2
    short = _battle(2, [("hi", "a", "b")])
    (ids2,) = f.encode([short])
    text = tiny_tokenizer.decode(ids2, skip_special_tokens=True)
    assert "hi" in text and "[...]" not in text and "omitted" not in text
    assert len(ids2) == f.full_lengths(f.tokenize([short])[0])


@needs_shared
@needs_llama3
def test_real_rows_with_llama3_tokenizer():
    from data.reading import read_battles
    from data.tokenizer import load_tokenizer

    battles = read_battles(REAL_TRAIN)[:300]
    f = Formatter(load_tokenizer(LLAMA3_TOKENIZER), FormatConfig(max_length=512))
    turns = f.tokenize(battles)
    for t in turns:
        ids, sw = f.render(t), f.render(t, swap=True)
        assert len(ids) <= 512 and len(ids) == len(sw)
        full = f.full_lengths(t)
        assert (len(ids) == full) == (full <= 512)
    # deterministic
    assert f.render(turns[0]) == Formatter(f.tok, f.cfg).render(turns[0])
