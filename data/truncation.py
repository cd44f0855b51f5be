"""Fair truncation of a battle to a token budget: pure functions on token counts and id lists.

The plan works on lengths only, so it is cheap, deterministic and symmetric under the A/B swap (swapping the
responses swaps their budgets), which the property tests check. Rendering with the template is in `template.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

Lengths = tuple[int, int, int]  # (prompt, response_a, response_b) token counts of one turn


@dataclass(frozen=True)
class Overheads:
    """Token counts of the template pieces that do not depend on the battle."""

    fixed: int  # BOS + suffix
    per_turn: int  # prompt, response A and response B headers of one turn
    omitted: int  # marker standing for dropped turns
    cut: int  # marker inside a part that lost its middle


@dataclass(frozen=True)
class TurnPlan:
    turn: int  # index into the battle's turns
    keep: Lengths  # tokens each part occupies in the output (== its length when uncut)


@dataclass(frozen=True)
class Plan:
    turns: tuple[TurnPlan, ...]  # chronological order
    omitted_before: bool  # an omitted-turns marker goes before the kept turns
    omitted_after: bool  # ... or after them

    @property
    def dropped(self) -> bool:
        return self.omitted_before or self.omitted_after


def fair_budgets(lengths: Lengths, budget: int) -> Lengths:
    """Split `budget` tokens between prompt, A and B by water-filling.

    Parts shorter than their share keep everything and give their slack to the others; the parts that overflow get
    equal shares, so when both responses overflow they get exactly the same budget. The integer remainder goes to
    the prompt first, then to a single overflowing response; it is never split unequally between A and B.
    """
    if budget < 0:
        raise ValueError(f"negative budget {budget}")
    if sum(lengths) <= budget:
        return lengths
    alloc = list(lengths)
    capped = {0, 1, 2}
    remaining = budget
    while capped:
        share = remaining // len(capped)
        small = {i for i in capped if lengths[i] <= share}
        if not small:
            break
        remaining -= sum(lengths[i] for i in small)
        capped -= small
    base, rest = divmod(remaining, len(capped))
    for i in capped:
        alloc[i] = base
    if 0 in capped:
        extra = min(rest, lengths[0] - base)
        alloc[0] += extra
        rest -= extra
    responses = capped - {0}
    if len(responses) == 1:
        (i,) = responses
        alloc[i] += min(rest, lengths[i] - base)
    return tuple(alloc)  # type: ignore[return-value]


def min_length(o: Overheads) -> int:
    """Smallest max_length the template can honour (one token per part of one turn)."""
    return o.fixed + o.per_turn + o.omitted + 3


def plan_truncation(
    turns: Sequence[Lengths], max_length: int, o: Overheads, keep: str = "last", min_partial: int = 32
) -> Plan:
    """Decide which turns survive and how many tokens each part keeps, so that the output has <= max_length tokens.

    Whole turns are kept in priority order (`keep="last"`: most recent first; `"first"`: oldest first). The next turn
    is then truncated fairly into what is left (if at least `min_partial` tokens remain, or if no turn fits whole);
    the rest are dropped and replaced by one omitted-turns marker. Nothing is cut when everything fits.
    """
    if keep not in ("last", "first"):
        raise ValueError(f"keep must be 'last' or 'first', got {keep!r}")
    if max_length < min_length(o):
        raise ValueError(f"max_length={max_length} is below the template's minimum of {min_length(o)} tokens")
    n = len(turns)
    if n == 0:
        raise ValueError("a battle needs at least one turn")
    avail = max_length - o.fixed
    costs = [o.per_turn + sum(t) for t in turns]
    if sum(costs) <= avail:
        return Plan(tuple(TurnPlan(i, tuple(turns[i])) for i in range(n)), False, False)

    order = list(range(n - 1, -1, -1)) if keep == "last" else list(range(n))
    whole: list[int] = []
    used = 0
    for i in order:  # the marker is reserved: not everything fits, so something is dropped or cut
        if used + costs[i] + o.omitted > avail:
            break
        whole.append(i)
        used += costs[i]
    rest = order[len(whole):]
    partial, dropped = rest[0], rest[1:]
    room = avail - used - o.per_turn - (o.omitted if dropped else 0)
    kept = {i: tuple(turns[i]) for i in whole}
    if whole and room < max(min_partial, 3):
        dropped = rest  # too little room for a useful fragment: drop it too (the marker was reserved above)
    else:
        kept[partial] = fair_budgets(tuple(turns[partial]), room)
    dropped_set = set(dropped)
    plan_turns = tuple(TurnPlan(i, kept[i]) for i in sorted(kept))
    before = bool(dropped_set) and min(dropped_set) < plan_turns[0].turn
    return Plan(plan_turns, before, bool(dropped_set) and not before)


def cut(ids: Sequence[int], keep: int, marker: Sequence[int], head_fraction: float = 0.5) -> list[int]:
    """Shorten `ids` to exactly `keep` tokens (or fewer when they fit): head + marker + tail.

    Budgets too small for the marker keep the head only.
    """
    if keep >= len(ids):
        return list(ids)
    if keep <= len(marker):
        return list(ids[:keep])
    body = keep - len(marker)
    head = int(body * head_fraction)
    tail = body - head
    return list(ids[:head]) + list(marker) + (list(ids[len(ids) - tail:]) if tail else [])
