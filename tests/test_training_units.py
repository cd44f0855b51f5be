"""Pure pieces of training/: batch sampler and collator, schedule, LoRA merge, RNG state, checkpoint pointer, eval
sharding. Fast (no process group, no DeepSpeed engine)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from data.batching import RandomBatchSampler, collate_padded
from training.inputs import SWAP_LABEL, eval_shard, examples_of
from training.model import lr_factor


# ------------------------------------------------------------------------------------------------ RandomBatchSampler


@pytest.mark.parametrize("lengths", [None, "random"])
def test_sampler_ranks_disjoint_equal_length_and_cover(lengths):
    n, bs, world = 103, 4, 3
    src = n if lengths is None else list(np.random.default_rng(0).integers(5, 300, n))
    samplers = [RandomBatchSampler(src, bs, world, r, seed=7) for r in range(world)]
    assert {len(s) for s in samplers} == {n // (bs * world)}
    per_rank = [list(s) for s in samplers]
    assert all(len(b) == len(per_rank[0]) for b in per_rank)
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen)) == len(per_rank[0]) * bs * world  # no example twice in an epoch
    assert all(len(b) == bs for batches in per_rank for b in batches)


def test_sampler_length_grouping_reduces_padding():
    lengths = list(np.random.default_rng(1).integers(10, 1000, 2000))
    grouped = RandomBatchSampler(lengths, 8, 1, 0, seed=0)
    plain = RandomBatchSampler(len(lengths), 8, 1, 0, seed=0)
    waste = lambda s: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in s)  # noqa: E731
    assert waste(grouped) < 0.3 * waste(plain)


def test_sampler_epochs_differ_and_are_reproducible():
    a = RandomBatchSampler(50, 5, 1, 0, seed=3)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    b = RandomBatchSampler(50, 5, 1, 0, seed=3)
    assert list(b) == e0 and e0 != e1


def test_sampler_resumes_at_the_saved_position():
    full = RandomBatchSampler(200, 4, 2, 1, seed=5)
    full.set_epoch(2)
    expected = list(full)
    s = RandomBatchSampler(200, 4, 2, 1, seed=5)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state == {"epoch": 2, "step": 7}
    resumed = RandomBatchSampler(200, 4, 2, 1, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a resumed loop calls set_epoch with the same epoch: the position is kept
    assert head + list(resumed) == expected
    resumed.set_epoch(3)
    assert resumed.state_dict() == {"epoch": 3, "step": 0}


def test_sampler_rejects_too_few_examples():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        RandomBatchSampler(5, 4, 2, 0)
    with pytest.raises(ValueError, match="bad sampler arguments"):
        RandomBatchSampler(50, 4, 2, 2)


def test_collate_padded_right_pads_and_masks():
    b = collate_padded([{"input_ids": [5, 6, 7], "label": 2}, {"input_ids": [8], "label": 0}], pad_id=1)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [2, 0]
    with pytest.raises(ValueError):
        collate_padded([], 0)


def test_full_swap_pairs_follow_each_other_with_swapped_labels():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6]], "swap_input_ids": [[2, 1], [3], [6, 5, 4]],
                                     "label": [0, 2, 1]})
    ex = examples_of(ds, [2, 0], full_swap=True)
    assert [e["input_ids"] for e in ex] == [[4, 5, 6], [6, 5, 4], [1, 2], [2, 1]]
    assert [e["label"] for e in ex] == [1, SWAP_LABEL[1], 0, SWAP_LABEL[0]] == [1, 0, 0, 1]


# ------------------------------------------------------------------------------------------------ schedule, eval shards


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[3:], f[4:]))  # non-increasing after warmup
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 10, 0.0) == 1.0


@pytest.mark.parametrize("n, world, bs", [(10, 3, 2), (7, 2, 4), (1, 2, 1), (80, 2, 8)])
def test_eval_shards_cover_everything_with_equal_batch_counts(n, world, bs):
    lengths = np.random.default_rng(n).integers(1, 100, n)
    shards = [eval_shard(n, world, r, lengths, bs) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # ZeRO-3: every rank joins every forward
    seen = {i for s in shards for b in s for i in b}
    assert seen == set(range(n))


# ------------------------------------------------------------------------------------------------ LoRA merge, RNG


def test_merge_lora_equals_peft_merge_and_unload():
    from peft import LoraConfig, get_peft_model

    from tests.conftest import tiny_llama_config
    from training.export import merge_lora
    from transformers import AutoModel

    torch.manual_seed(0)
    base = AutoModel.from_config(tiny_llama_config(128))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero: make the adapter matter
            torch.nn.init.normal_(p, std=0.1)
    state = {"backbone." + k: v.detach().clone() for k, v in model.state_dict().items()}
    ours = merge_lora(state, scaling=8 / 4)
    reference = model.merge_and_unload().state_dict()
    assert set(ours) == {"backbone." + k for k in reference}
    for k, v in reference.items():
        torch.testing.assert_close(ours["backbone." + k], v, rtol=1e-5, atol=1e-6)


def test_lora_adapters_of_a_bf16_model_train_in_bf16():
    """CPU twin of GPU bf16 LoRA training: peft upcasts the adapters of a bf16 model to fp32, which DeepSpeed's bf16
    engine refuses (check_param_dtypes names them); add_lora casts them to the training dtype."""
    from transformers import AutoModel

    from tests.conftest import tiny_llama_config
    from tests.test_configs import TINY
    from training.config import load_config
    from training.model import add_lora, check_param_dtypes

    cfg = load_config(TINY, ["lora.enabled=true", "lora.r=4", "lora.alpha=8"], check_files=False)
    base = lambda: AutoModel.from_config(tiny_llama_config(128), dtype=torch.bfloat16)  # noqa: E731
    with pytest.raises(RuntimeError, match="lora_A"):  # what peft alone gives
        check_param_dtypes(add_lora(cfg, base()), torch.bfloat16)
    model = add_lora(cfg, base(), torch.bfloat16)
    check_param_dtypes(model, torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)


def test_rng_state_roundtrip_loads_weights_only(tmp_path):
    from training.checkpoint import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(3).tolist()) == expected


def test_find_resume_follows_latest_and_rejects_incomplete(tmp_path):
    from training.checkpoint import LATEST, STATE_FILE, find_resume, prune
    from training.config import load_config

    from tests.test_configs import TINY

    cfg = load_config(TINY, [f"output_dir={tmp_path}"], check_files=False)
    assert find_resume(cfg) is None
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / STATE_FILE).write_text("{}")
    (root / ".tmp_step_00000040").mkdir()  # a save that crashed before its rename: never picked
    (root / LATEST).write_text("step_00000020")
    assert find_resume(cfg) == root / "step_00000020"
    prune(root, keep_last=2, keep="step_00000030")
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000020", "step_00000030"]
    (root / LATEST).write_text("step_00000010")
    with pytest.raises(FileNotFoundError, match="incomplete or missing"):
        find_resume(cfg)
    assert find_resume(load_config(TINY, [f"output_dir={tmp_path}", "resume=never"], check_files=False)) is None


def test_refuses_to_start_when_the_memory_plan_does_not_fit(monkeypatch):
    from training.config import load_config
    from training.distributed import Dist
    from training.train import check_memory_plan

    from tests.test_configs import ROOT

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    gpu = Dist(rank=0, world_size=8, local_rank=0, device=torch.device("cuda", 0))  # what a GPU rank would see
    preset = ROOT / "configs" / "gemma2" / "9b_full.yaml"
    check_memory_plan(load_config(preset, check_files=False), gpu)  # fits on 8 x 80 GB: no error
    small = load_config(preset, ["hardware.gpu_memory_gb=16"], check_files=False)
    with pytest.raises(SystemExit, match="does not fit, refusing to start"):
        check_memory_plan(small, gpu)
    check_memory_plan(load_config(preset, ["hardware.gpu_memory_gb=16", "hardware.check_memory=false"],
                                  check_files=False), gpu)
    cpu = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    check_memory_plan(small, cpu)  # the plan is about GPU memory: CPU runs are not checked


# ------------------------------------------------------------------------------------------------ training dtype


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float32), ((7, 0), torch.float32),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_train_dtype_counts_only_native_bf16(monkeypatch, capability, dtype):
    """T4 (7.5) and V100 (7.0) "support" bf16 by emulation (torch.cuda.is_bf16_supported() is True there): auto
    must still fall back to fp32, and an explicit bfloat16 is refused."""
    from training.config import load_config
    from training.model import train_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    preset = "configs/tiny/llama_cpu.yaml"
    cuda = torch.device("cuda", 0)
    assert train_dtype(load_config(preset, [], check_files=False), cuda) == dtype
    explicit = load_config(preset, ["model.dtype=bfloat16"], check_files=False)
    if dtype == torch.bfloat16:
        assert train_dtype(explicit, cuda) == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="no native bf16"):
            train_dtype(explicit, cuda)
    assert train_dtype(load_config(preset, [], check_files=False), torch.device("cpu")) == torch.float32


def test_pretrained_weights_load_onto_the_rank_device_unless_zero3_partitions_them():
    from training.config import load_config
    from training.model import pretrained_placement

    preset = "configs/tiny/llama_cpu.yaml"
    zero3 = load_config(preset, [], check_files=False)
    zero2 = load_config(preset, ["deepspeed.config=configs/deepspeed/zero2.json"], check_files=False)
    rank3 = torch.device("cuda", 3)
    assert pretrained_placement(zero3, torch.bfloat16, rank3) == {}  # HfDeepSpeedConfig partitions while loading
    assert pretrained_placement(zero2, torch.bfloat16, rank3) == {"device_map": {"": "cuda:3"}}


# ------------------------------------------------------------------------------------------------ export replacement


def test_replace_dir_never_loses_the_previous_export(tmp_path, monkeypatch):
    import os

    from training import checkpoint
    from training.checkpoint import recover_dir, replace_dir

    final, new = tmp_path / "final", tmp_path / ".final.tmp"
    final.mkdir()
    (final / "arena.json").write_text("old")
    new.mkdir()
    (new / "arena.json").write_text("new")
    real_replace, calls = os.replace, []

    def crash_on_second(a, b):  # the process dies between moving the old export aside and the new one in
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(a, b)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, final)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert not final.exists()  # the crash window the old delete-then-rename lost the export in
    assert recover_dir(final) and (final / "arena.json").read_text() == "old"
    replace_dir(new, final)  # the retried export
    assert (final / "arena.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert not recover_dir(final)
