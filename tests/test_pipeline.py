"""--parallel pipeline: the layer split, stage-by-stage forward == one-device forward, and end to end on cpu:2."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.pipeline import layer_of, split_layers, stage_bytes
from tests.conftest import tiny_classifier


# -- the split ----------------------------------------------------------------------------------------------------
def test_split_balances_bytes_with_embeddings_on_the_first_stage():
    # 8 equal layers, embeddings worth 2 layers: stage 0 takes fewer layers
    assert split_layers([10] * 8, 2, first_extra=20) == [(0, 3), (3, 8)]
    assert split_layers([10] * 8, 2, last_extra=20) == [(0, 5), (5, 8)]
    assert split_layers([10] * 8, 2) == [(0, 4), (4, 8)]
    assert split_layers([1, 1, 1, 9], 2) == [(0, 3), (3, 4)]


def test_split_is_optimal_and_covers_every_layer():
    rng = np.random.default_rng(0)
    for _ in range(30):
        w = rng.integers(1, 100, size=int(rng.integers(3, 12))).tolist()
        k = int(rng.integers(2, min(4, len(w)) + 1))
        bounds = split_layers(w, k, 7, 5)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(w)
        assert all(a < b for a, b in bounds) and all(bounds[i][1] == bounds[i + 1][0] for i in range(k - 1))
        loads = [sum(w[a:b]) + (7 if s == 0 else 0) + (5 if s == k - 1 else 0) for s, (a, b) in enumerate(bounds)]
        # brute force over all cut points: nothing beats it
        import itertools

        best = min(max(sum(w[a:b]) + (7 if s == 0 else 0) + (5 if s == k - 1 else 0)
                       for s, (a, b) in enumerate(zip((0, *c), (*c, len(w)))))
                   for c in itertools.combinations(range(1, len(w)), k - 1))
        assert max(loads) == best


def test_split_refuses_more_stages_than_layers():
    with pytest.raises(ValueError, match="2 layers cannot be split over 3 stages"):
        split_layers([1, 1], 3)


def test_stage_bytes_groups_tensors_by_layer():
    sizes = {"embed_tokens.weight": 100, "layers.0.mlp.up_proj.weight": 10, "layers.1.self_attn.q_proj.weight": 7,
             "layers.1.input_layernorm.weight": 1, "norm.weight": 3}
    assert stage_bytes(sizes, 2) == ([10, 8], 100, 3)
    assert layer_of("model.layers.12.mlp.weight") == 12 and layer_of("norm.weight") is None


# -- stage-by-stage forward ---------------------------------------------------------------------------------------
def right_padded(lengths, vocab=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_stages_in_sequence_equal_the_whole_model(family):
    from transformers import AutoModel

    from inference.modeling import ArenaClassifier
    from inference.pipeline import split_model
    from tests.conftest import tiny_gemma2_config, tiny_llama_config

    torch.manual_seed(0)
    cfg = (tiny_llama_config if family == "llama" else tiny_gemma2_config)()
    cfg.num_hidden_layers = 4
    if family == "gemma2":
        cfg.layer_types = ["sliding_attention", "full_attention"] * 2
    model = ArenaClassifier(AutoModel.from_config(cfg, attn_implementation="eager")).eval()
    model.reset_head()
    ids, mask = right_padded([40, 23, 7, 40, 1])  # sequences longer than Gemma2's sliding window of 16
    with torch.no_grad():
        whole = model(ids, attention_mask=mask)
        for bounds in ([(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]):
            h = ids
            for stage in split_model(model, bounds):
                h = stage(h, mask)
            assert h.shape == (5, 3)
            assert (h - whole).abs().max().item() < 1e-5, bounds
    # the sliding window matters for these lengths: a model with a long window gives other logits
    if family == "gemma2":
        model.backbone.config.sliding_window = 4096
        with torch.no_grad():
            assert (model(ids, attention_mask=mask) - whole).abs().max().item() > 1e-4
