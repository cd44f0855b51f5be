"""Packing: bin packing and sampler properties, the packed collator, and exactness of packed forward/backward passes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from data.packing import (
    VARLEN_CPU, PackedBatchSampler, attn_implementation_of, check_packed_attention, collate_packed, cu_seqlens_for,
    deal_into_bins, epoch_layout, first_fit_decreasing, last_token_index, pack_group, packed_attn_implementation,
    packed_forward_kwargs, packed_loss, position_ids_for,
)
from tests.conftest import tiny_classifier

# ----------------------------------------------------------------------------------------------------- pure functions


def test_row_geometry():
    lengths = [3, 1, 2]
    assert position_ids_for(lengths).tolist() == [0, 1, 2, 0, 0, 1]
    assert cu_seqlens_for(lengths).tolist() == [0, 3, 4, 6]
    assert cu_seqlens_for(lengths).dtype == np.int32
    assert last_token_index(lengths).tolist() == [2, 3, 5]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=40))
def test_row_geometry_matches_transformers(lengths):
    """CPU twin of the flash path: our cu_seqlens / max_seqlen are what transformers derives from position_ids."""
    from transformers.masking_utils import find_packed_sequence_indices
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    pos = torch.from_numpy(position_ids_for(lengths)).unsqueeze(0)
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(pos)
    assert cu_q.tolist() == cu_seqlens_for(lengths).tolist() == cu_k.tolist()
    assert int(max_q) == max(lengths)
    seq = find_packed_sequence_indices(pos)  # the eager/sdpa path: one block per example
    expected = np.repeat(np.arange(len(lengths)), lengths)
    assert (seq is None and len(lengths) == 1) or seq[0].tolist() == expected.tolist()


@settings(deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=60), st.integers(1, 12))
def test_deal_into_bins(lengths, n_bins):
    cap = max(lengths) * 3
    bins = deal_into_bins(lengths, n_bins, cap)
    if bins is None:
        assert len(lengths) < n_bins or sum(lengths) > n_bins * (cap - max(lengths))
        return
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(b for b in bins) and max(loads) <= cap
    assert max(loads) - min(loads) <= max(lengths)  # longest-first dealing: spread of at most one item


@settings(deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=60), st.integers(100, 400), st.integers(1, 4))
def test_pack_group_vs_ffd(lengths, cap, multiple):
    ffd = first_fit_decreasing(lengths, cap)
    assert sorted(i for b in ffd for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= cap for b in ffd)
    bins = pack_group(lengths, cap, multiple)
    if bins is not None:
        assert len(bins) % multiple == 0
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(b and sum(lengths[i] for i in b) <= cap for b in bins)
    if max(lengths) * 4 <= cap and len(lengths) >= 2 * multiple:
        assert bins is not None  # small items: always packable (see test_sampler_properties)


# ------------------------------------------------------------------------------------------------------------ sampler


def run_epoch(samplers):
    return [list(s) for s in samplers]


def make_samplers(lengths, cap, ranks, seed=0, **kw):
    return [PackedBatchSampler(lengths, cap, num_replicas=ranks, rank=r, seed=seed, **kw) for r in range(ranks)]


sampler_cases = st.tuples(
    st.lists(st.integers(1, 64), min_size=8, max_size=120),
    st.integers(1, 4),  # ranks
    st.integers(1, 6),  # max_tokens in units of 64 (4 and up: items <= cap/4, always packable)
    st.integers(0, 3),  # seed
    st.integers(1, 3),  # mega_batch_steps
)


@settings(max_examples=60, deadline=None)
@given(sampler_cases)
def test_sampler_properties(case):
    lengths, ranks, k, seed, mega = case
    cap = 64 * k
    try:
        samplers = make_samplers(lengths, cap, ranks, seed, mega_batch_steps=mega)
    except ValueError:
        event("no layout")
        assert k < 4  # with every item <= cap/4 and >= 2 items per rank a layout always exists
        return
    for epoch in range(2):
        n_steps = [len(s) for s in samplers]
        per_rank = run_epoch(samplers)
        assert [len(b) for b in per_rank] == n_steps and len(set(n_steps)) == 1 and n_steps[0] > 0  # same steps
        seen = sorted(i for batches in per_rank for b in batches for i in b)
        assert seen == list(range(len(lengths)))  # every example exactly once across ranks
        for step in zip(*per_rank):
            tokens = [sum(lengths[i] for i in b) for b in step]
            assert all(b for b in step) and max(tokens) <= cap
            assert max(tokens) - min(tokens) <= max(lengths)  # balanced to within one example
        assert all(s.epoch == epoch + 1 and s.step == 0 for s in samplers)
    # deterministic for seed and epoch
    again = make_samplers(lengths, cap, ranks, seed, mega_batch_steps=mega)
    for s in again:
        s.set_epoch(1)
    assert run_epoch(again) == [[step[s.rank] for step in s.layout(1)] for s in samplers]


def test_balance_on_long_tailed_lengths():
    """Real-like lengths (log-normal, capped at max_length 2048): 8 ranks within 5% tokens, every step."""
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(6.3, 0.8, 3000).astype(int) + 50, 2048).tolist()
    for cap in (8192, 16384):
        steps = epoch_layout(lengths, cap, 8, seed=0, epoch=0)
        tokens = np.array([[sum(lengths[i] for i in b) for b in step] for step in steps])
        squares = np.array([[sum(lengths[i] ** 2 for i in b) for b in step] for step in steps])
        assert (tokens.max(1) / tokens.min(1)).max() <= 1.05
        assert (squares.max(1) / squares.min(1)).mean() <= 1.1
        assert tokens.sum() / (tokens.size * cap) > 0.9  # bins nearly full: few extra steps


def test_epochs_differ_and_ranks_disjoint():
    lengths = list(range(1, 200))
    a = PackedBatchSampler(lengths, 512, num_replicas=2, rank=0, seed=1)
    assert a.layout(0) != a.layout(1)
    assert a.layout(0) != PackedBatchSampler(lengths, 512, num_replicas=2, rank=0, seed=2).layout(0)


@given(st.integers(0, 30), st.integers(0, 2))
@settings(max_examples=25, deadline=None)
def test_resume_continues_identically(stop, stop_epoch):
    lengths = [(i * 37) % 61 + 1 for i in range(150)]
    make = lambda: PackedBatchSampler(lengths, 128, num_replicas=2, rank=1, seed=3, mega_batch_steps=2)  # noqa: E731

    def train(sampler, epochs, interrupt_at=None):
        seen = []
        for epoch in range(sampler.epoch, epochs):
            sampler.set_epoch(epoch)
            for batch in sampler:
                seen.append(batch)
                if interrupt_at == (epoch, sampler.step):
                    return seen, sampler.state_dict()
        return seen, None

    full, _ = train(make(), 3)
    stop = min(stop, len(make().layout(stop_epoch)))
    first, state = train(make(), 3, interrupt_at=(stop_epoch, stop))
    if state is None:  # stop == 0: nothing to interrupt
        event("nothing to resume")
        return
    resumed = make()
    resumed.load_state_dict(state)
    rest, _ = train(resumed, 3)
    assert first + rest == full


def test_sampler_errors():
    with pytest.raises(ValueError, match="example 2 has 300 tokens"):
        PackedBatchSampler([10, 20, 300], 256)
    with pytest.raises(ValueError, match="ranks"):
        PackedBatchSampler([10, 20], 256, num_replicas=3, rank=0)
    with pytest.raises(ValueError, match="same number"):  # 3 examples that cannot share a bin, 2 ranks
        PackedBatchSampler([200, 200, 200], 256, num_replicas=2)
    s = PackedBatchSampler([10] * 20, 64, num_replicas=2, seed=0)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({**s.state_dict(), "seed": 1})


def test_state_dict_with_consumed_steps_and_epoch_end():
    s = PackedBatchSampler([10] * 40, 64)
    assert s.state_dict(step=2)["step"] == 2
    end = s.state_dict(step=len(s))
    assert (end["epoch"], end["step"]) == (1, 0)
    assert s.examples_in_step(0) == sum(len(b) for b in s.layout()[0])


def test_dataloader_with_dataset():
    import datasets

    rows = {"input_ids": [[5] * n for n in (3, 9, 4, 7, 2, 8)], "label": [0, 1, 2, 0, 1, 2]}
    ds = datasets.Dataset.from_dict(rows)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=PackedBatchSampler([3, 9, 4, 7, 2, 8], 16),
                                         collate_fn=collate_packed)
    batches = list(loader)
    assert sum(b["num_examples"] for b in batches) == 6
    assert all(b["input_ids"].shape[1] <= 16 for b in batches)


# ------------------------------------------------------------------------------------------- collator and the model


def features(lengths, seed=0, vocab=1024):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist(), "label": i % 3}
            for i, n in enumerate(lengths)]


def test_collate_packed():
    feats = features([4, 1, 3])
    b = collate_packed(feats)
    assert b["input_ids"].shape == b["position_ids"].shape == (1, 8)
    assert b["input_ids"][0].tolist() == [t for f in feats for t in f["input_ids"]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 0, 1, 2]
    assert b["cu_seqlens"].tolist() == [0, 4, 5, 8] and b["cu_seqlens"].dtype == torch.int32
    assert b["pool_index"].tolist() == [3, 4, 7] and b["max_seqlen"] == 4
    assert b["labels"].tolist() == [0, 1, 2] and b["num_examples"] == 3
    with pytest.raises(ValueError):
        collate_packed([])


# sliding window 16 in the tiny Gemma2: lengths above it check that the window is applied per example
LENGTHS = [37, 5, 60, 1, 23, 17]


PACKED_ATTENTION = [("llama", "sdpa"), ("llama", VARLEN_CPU), ("gemma2", "eager"), ("gemma2", VARLEN_CPU)]


def classifier(family: str, attn: str, seed: int = 0):
    """tiny_classifier with another attention implementation (same weights for the same seed)."""
    model = tiny_classifier(family, seed)
    check_packed_attention(attn, family)  # registers the varlen twin
    model.backbone.set_attn_implementation(attn)
    assert attn_implementation_of(model) == attn
    return model


@pytest.mark.parametrize("family,attn", PACKED_ATTENTION)
def test_packed_logits_equal_alone(family, attn):
    model = classifier(family, attn)
    feats = features(LENGTHS)
    with torch.no_grad():
        packed = model(**packed_forward_kwargs(collate_packed(feats), attn))
        alone = torch.cat([model(torch.tensor([f["input_ids"]])) for f in feats])
        reference = torch.cat([tiny_classifier(family)(torch.tensor([f["input_ids"]])) for f in feats])
    assert (alone - reference).abs().max().item() <= 1e-5  # the varlen twin on single rows: stock attention
    assert packed.shape == (len(LENGTHS), 3)
    assert (packed - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family,attn", PACKED_ATTENTION)
def test_packed_gradient_equals_one_by_one(family, attn):
    feats = features(LENGTHS, seed=1)
    labels = torch.tensor([f["label"] for f in feats])

    packed_model = classifier(family, attn).train()
    batch = collate_packed(feats)
    loss = packed_loss(packed_model(**packed_forward_kwargs(batch, attn)), batch["labels"])
    loss.backward()

    single_model = tiny_classifier(family).train()  # stock attention, one example at a time
    total = 0.0
    for f, y in zip(feats, labels):
        one = packed_loss(single_model(torch.tensor([f["input_ids"]])), y[None], denominator=len(feats))
        one.backward()
        total += one.item()
    assert abs(loss.item() - total) <= 1e-5
    for (name, p), q in zip(packed_model.named_parameters(), single_model.parameters()):
        assert p.grad is not None, name
        scale = q.grad.abs().max().item() + 1e-8
        assert (p.grad - q.grad).abs().max().item() <= 1e-5 * max(1.0, scale), name


def test_packed_loss_denominator():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    mean = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(packed_loss(logits, labels), mean)
    assert torch.allclose(packed_loss(logits, labels, denominator=8), mean / 2)


def test_check_packed_attention():
    check_packed_attention("sdpa", "llama")
    check_packed_attention("eager", "gemma2")
    with pytest.raises(ValueError, match="flex"):
        check_packed_attention("flex_attention", "llama")
    with pytest.raises(ValueError, match="eager"):
        check_packed_attention("sdpa", "gemma2")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"arena-pref\[gpu\]"):
            check_packed_attention("flash_attention_2", "llama")


def test_flash_kwargs_only_for_varlen():
    b = collate_packed(features([4, 2]))
    assert set(packed_forward_kwargs(b, "sdpa")) == {"input_ids", "position_ids", "pool_index"}
    for attn in ("flash_attention_2", VARLEN_CPU):
        fa = packed_forward_kwargs(b, attn)
        assert fa["cu_seq_lens_q"].tolist() == [0, 4, 6] and fa["max_length_q"] == 4 == fa["max_length_k"]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_varlen_twin_from_position_ids(family):
    """Without cu_seqlens the varlen twin splits on position_ids (as transformers' flash path does)."""
    model = classifier(family, VARLEN_CPU)
    batch = collate_packed(features(LENGTHS))
    with torch.no_grad():
        with_cu = model(**packed_forward_kwargs(batch, VARLEN_CPU))
        from_pos = model(**packed_forward_kwargs(batch, "sdpa"))
    assert (with_cu - from_pos).abs().max().item() <= 1e-6


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_varlen_twin_on_padded_batches(family, side):
    """A model trained packed with the varlen twin evaluates padded batches exactly too (like flash unpadding)."""
    feats = features(LENGTHS)
    width = max(LENGTHS)
    ids = torch.zeros(len(feats), width, dtype=torch.long)
    mask = torch.zeros(len(feats), width, dtype=torch.long)
    for r, f in enumerate(feats):
        span = slice(0, len(f["input_ids"])) if side == "right" else slice(width - len(f["input_ids"]), width)
        ids[r, span], mask[r, span] = torch.tensor(f["input_ids"]), 1
    with torch.no_grad():
        varlen = classifier(family, VARLEN_CPU)(ids, mask)
        stock = tiny_classifier(family)(ids, mask)
        unpadded = classifier(family, VARLEN_CPU)(ids[:, :5])  # no padding at all: one sequence per row
        unpadded_stock = tiny_classifier(family)(ids[:, :5])
    assert (varlen - stock).abs().max().item() <= 1e-5
    assert (unpadded - unpadded_stock).abs().max().item() <= 1e-5


def test_packed_attn_implementation_on_cpu():
    assert packed_attn_implementation("gemma2", "cpu") == VARLEN_CPU


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_flash_varlen_packed_equals_alone(family):
    """GPU twin of test_packed_logits_equal_alone: flash-attention 2 varlen with the collator's cu_seqlens."""
    from transformers import AutoModel

    from inference.modeling import ArenaClassifier
    from tests.conftest import tiny_gemma2_config, tiny_llama_config

    check_packed_attention("flash_attention_2", family)
    torch.manual_seed(0)
    cfg = tiny_llama_config() if family == "llama" else tiny_gemma2_config()
    backbone = AutoModel.from_config(cfg, attn_implementation="flash_attention_2", dtype=torch.bfloat16)
    model = ArenaClassifier(backbone).cuda().eval()
    model.reset_head()
    feats = features(LENGTHS)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate_packed(feats).items()}
    with torch.no_grad():
        packed = model(**packed_forward_kwargs(batch, "flash_attention_2")).float()
        alone = torch.cat([model(torch.tensor([f["input_ids"]], device="cuda")) for f in feats]).float()
    assert (packed - alone).abs().max().item() <= 2e-2  # bf16
