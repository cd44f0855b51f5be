"""The conversation template: its text lives here and only here, and travels with every exported model.

A battle is rendered as

    [BOS] {prompt_header}<prompt 1>{a_header}<response A 1>{b_header}<response B 1> ... {suffix}

Each piece is tokenized on its own and the id lists are concatenated, so truncation works on exact token counts and
the rendered sequence is the same in training and inference. The suffix ends every sequence, so the last token (the
one a decoder classifier pools) always sees the whole conversation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

from .reading import Battle
from .truncation import Lengths, Overheads, Plan, cut, plan_truncation


@dataclass(frozen=True)
class FormatConfig:
    """How a battle becomes tokens. Saved in `arena.json` next to exported weights."""

    max_length: int = 2048
    prompt_header: str = "\n\n<|prompt|>\n"
    a_header: str = "\n\n<|response_a|>\n"
    b_header: str = "\n\n<|response_b|>\n"
    suffix: str = "\n\n<|verdict|> Which response is better: A, B, or tie?"
    cut_marker: str = " [...] "
    omitted_marker: str = "\n\n[earlier turns omitted]"
    add_bos: bool = True
    keep_turns: str = "last"  # which whole turns survive when a conversation is too long: "last" or "first"
    head_fraction: float = 0.5  # share of a cut part's budget kept from its beginning (the rest from its end)
    min_partial: int = 32  # a partly kept turn needs at least this many tokens, else it is dropped

    def __post_init__(self):
        if self.keep_turns not in ("last", "first"):
            raise ValueError(f"keep_turns must be 'last' or 'first', got {self.keep_turns!r}")
        if not 0.0 <= self.head_fraction <= 1.0:
            raise ValueError(f"head_fraction must be in [0, 1], got {self.head_fraction}")
        if self.max_length < 16:
            raise ValueError(f"max_length={self.max_length} is too small")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FormatConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown format keys: {sorted(unknown)}")
        return cls(**d)


TurnIds = tuple[list[int], list[int], list[int]]  # (prompt, response_a, response_b) ids of one turn


class Formatter:
    """Renders battles to token ids with a tokenizer and a `FormatConfig`."""

    def __init__(self, tokenizer, cfg: FormatConfig):
        self.tok = tokenizer
        self.cfg = cfg
        enc = lambda s: list(tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]) if s else []  # noqa: E731
        self.headers = (enc(cfg.prompt_header), enc(cfg.a_header), enc(cfg.b_header))
        self.suffix = enc(cfg.suffix)
        self.cut_ids = enc(cfg.cut_marker)
        self.omitted_ids = enc(cfg.omitted_marker)
        # the sequence start: BOS for decoders, [CLS] for BERT-style encoders (which have no BOS and pool position 0)
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            bos = getattr(tokenizer, "cls_token_id", None)
        self.bos = [bos] if (cfg.add_bos and bos is not None) else []
        if not self.suffix:
            raise ValueError("the template suffix must not be empty: its last token is pooled")
        self.overheads = Overheads(
            fixed=len(self.bos) + len(self.suffix),
            per_turn=sum(len(h) for h in self.headers),
            omitted=len(self.omitted_ids),
            cut=len(self.cut_ids),
        )

    def tokenize(self, battles: Sequence[Battle], batch_size: int = 1000) -> list[list[TurnIds]]:
        """Token ids of every part of every turn (batched through the fast tokenizer)."""
        texts: list[str] = []
        for b in battles:
            for t in range(b.n_turns):
                texts += [b.prompt[t], b.response_a[t], b.response_b[t]]
        ids: list[list[int]] = []
        for s in range(0, len(texts), batch_size):
            chunk = texts[s : s + batch_size]
            # verbose=False: whole parts may exceed the model's maximum length; they are truncated exactly below,
            # so the tokenizer's "sequence longer than the maximum" warning would only mislead
            ids += [list(x) for x in self.tok(chunk, add_special_tokens=False, verbose=False)["input_ids"]]
        out, k = [], 0
        for b in battles:
            turns = []
            for _ in range(b.n_turns):
                turns.append((ids[k], ids[k + 1], ids[k + 2]))
                k += 3
            out.append(turns)
        return out

    def plan(self, turns: Sequence[TurnIds], max_length: int | None = None) -> Plan:
        lengths: list[Lengths] = [(len(p), len(a), len(b)) for p, a, b in turns]
        return plan_truncation(
            lengths, max_length or self.cfg.max_length, self.overheads, self.cfg.keep_turns, self.cfg.min_partial
        )

    def render(self, turns: Sequence[TurnIds], swap: bool = False, max_length: int | None = None) -> list[int]:
        """Input ids of one battle, at most `max_length` (default: the config's) tokens long.

        swap=True renders the A/B-swapped battle; by symmetry of the plan it equals rendering the swapped battle.
        """
        if swap:
            turns = [(p, b, a) for p, a, b in turns]
        plan = self.plan(turns, max_length)
        out = list(self.bos)
        if plan.omitted_before:
            out += self.omitted_ids
        for tp in plan.turns:
            for header, ids, keep in zip(self.headers, turns[tp.turn], tp.keep):
                out += header
                out += cut(ids, keep, self.cut_ids, self.cfg.head_fraction)
        if plan.omitted_after:
            out += self.omitted_ids
        out += self.suffix
        return out

    def encode(self, battles: Sequence[Battle], swap: bool = False, max_length: int | None = None) -> list[list[int]]:
        return [self.render(t, swap, max_length) for t in self.tokenize(battles)]

    def full_lengths(self, turns: Sequence[TurnIds]) -> int:
        """Untruncated length of a battle (for stats and cost estimates)."""
        return self.overheads.fixed + sum(self.overheads.per_turn + len(p) + len(a) + len(b) for p, a, b in turns)
