"""The memory planner: DeepSpeed agreement for model states, the activation formula against what autograd really
saves (tiny bf16 models on the CPU), and the fit/advice logic."""
from __future__ import annotations

import re
from types import SimpleNamespace as NS

import pytest
import torch

from tests.conftest import tiny_gemma2_config, tiny_llama_config
from training.architectures import ARCHITECTURES, build_config, count_parameters, model_config_for
from training.plan import PlanError, Shape, inputs_from_config, plan_for_config, saved_activation_bytes


def run_cfg(arch="gemma2-9b", tiny=None, ckpt=True, mbs=2, max_length=2048, packing=False, max_tokens=0,
            ds="configs/deepspeed/zero3.json", gpu_gb=80.0, lora=False, attn=None, dtype="bf16"):
    """A stand-in for training.config.RunConfig with just the fields the planner reads."""
    return NS(
        model=NS(name_or_path=None, architecture=None if tiny else arch, tiny=tiny, gradient_checkpointing=ckpt,
                 dtype=dtype, attn_implementation=attn),
        data=NS(format=NS(max_length=max_length), micro_batch_size=mbs, packing=packing, max_tokens=max_tokens),
        deepspeed=NS(config=ds, zero_stage=None, offload_optimizer=None, offload_params=None),
        lora=NS(enabled=lora, r=16, target_modules=("q_proj", "v_proj"), qlora=False),
        hardware=NS(gpu_memory_gb=gpu_gb),
    )


def deepspeed_printed_gpu_gib(capsys, total, largest, gpus, nodes, offload_param=False, offload_optimizer=False):
    """DeepSpeed's own print-out (estimate_zero3_model_states_mem_needs_all_cold), parsed: per-GPU GiB of one row."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    capsys.readouterr()
    estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=gpus, num_nodes=nodes)
    out = capsys.readouterr().out
    for line in out.splitlines():
        m = re.search(r"\|\s*([\d.]+)GB \| offload_param=(\S+), offload_optimizer=(\S+), zero_init=1", line)
        if m and (m.group(2) != "none", m.group(3) != "none") == (offload_param, offload_optimizer):
            return float(m.group(1))
    raise AssertionError(f"no row for offload_param={offload_param}, offload_optimizer={offload_optimizer} in:\n{out}")


# ------------------------------------------------------------------------------------------------ shapes


def test_published_shapes_give_published_parameter_counts():
    # Backbones without LM head: Gemma-2-9B is 9.24B (tied embedding), Llama-3-8B 8.03B minus its 525M lm_head.
    gemma = count_parameters(build_config("gemma2-9b"))
    llama = count_parameters(build_config("llama3-8b"))
    assert abs(gemma.total / 9.24e9 - 1) < 0.005
    assert abs(llama.total / (8.03e9 - 128256 * 4096) - 1) < 0.005
    assert gemma.largest_layer == 256000 * 3584  # the embedding is what ZeRO-3 gathers at its largest
    assert llama.largest_layer == 128256 * 4096
    cfg = build_config("gemma2-9b")
    assert (cfg.num_hidden_layers, cfg.head_dim, cfg.sliding_window, cfg.query_pre_attn_scalar) == (42, 256, 4096, 256)
    assert build_config("llama3-8b").rope_parameters["rope_theta"] == 500000.0
    with pytest.raises(KeyError, match="known"):
        build_config("gpt5")


def test_counts_equal_deepspeed_model_to_params_on_a_real_tiny_model():
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModel

    for config in (tiny_llama_config(), tiny_gemma2_config()):
        ours = count_parameters(config)
        assert (ours.total, ours.largest_layer) == model_to_params(AutoModel.from_config(config))


def test_model_shape_from_local_dir_and_errors(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path)
    config = model_config_for(NS(architecture=None, tiny=None, name_or_path=str(tmp_path)))
    assert config.hidden_size == 64
    with pytest.raises(ValueError, match="model.architecture"):
        model_config_for(NS(architecture=None, tiny=None, name_or_path=str(tmp_path / "missing")))


# ------------------------------------------------------------------------------------------------ DeepSpeed


@pytest.mark.parametrize("nodes", [1, 2])
def test_gemma2_9b_full_ft_on_a100_80gb_agrees_with_deepspeed(nodes, capsys):
    p = plan_for_config(run_cfg(), gpus_per_node=8, nodes=nodes)
    text = p.render()
    with capsys.disabled():
        print(f"\n{text}\n")
    ds_gib = deepspeed_printed_gpu_gib(capsys, p.deepspeed_estimate.total_params, p.inputs.counts.largest_layer, 8,
                                       nodes)
    assert abs(p.deepspeed_estimate.gpu_gib - ds_gib) < 0.01  # the number in the plan is DeepSpeed's own
    assert 0.9 <= p.model_states_gib / ds_gib <= 1.1
    assert f"ratio {p.model_states_gib / p.deepspeed_estimate.gpu_gib:.2f}" in text
    assert p.fits and "FITS" in text and not p.advice
    assert "Activations" in text and "not in it" in text  # says what DeepSpeed does not cover


@pytest.mark.parametrize("offload_params", [False, True])
def test_offload_settings_agree_with_deepspeed(offload_params, capsys):
    cfg = run_cfg()
    cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_params = True, offload_params
    p = plan_for_config(cfg, 8, 1)
    ds_gib = deepspeed_printed_gpu_gib(capsys, p.deepspeed_estimate.total_params, p.inputs.counts.largest_layer, 8, 1,
                                       offload_param=offload_params, offload_optimizer=True)
    assert 0.9 <= p.model_states_gib / ds_gib <= 1.1
    assert p.cpu_gib_per_node > 0 and p.optimizer_gib == 0


def test_zero2_agrees_with_deepspeed():
    p = plan_for_config(run_cfg(arch="llama3-8b", ds="configs/deepspeed/zero2.json"), 8, 1)
    assert p.deepspeed_estimate.function.startswith("estimate_zero2")
    assert 0.9 <= p.deepspeed_ratio <= 1.1


# ------------------------------------------------------------------------------------------------ fit and advice


def test_9b_full_ft_on_one_16gb_gpu_does_not_fit_and_says_what_to_change():
    p = plan_for_config(run_cfg(gpu_gb=16.0, ckpt=False), gpus_per_node=1, nodes=1)
    assert not p.fits and p.advice
    text = p.render()
    assert "DOES NOT FIT" in text and "model.gradient_checkpointing=true" in text
    assert any("zero3_offload.json" in a for a in p.advice)
    assert any(a.startswith("together:") and a.endswith("(fits)") for a in p.advice)
    with pytest.raises(PlanError, match="does not fit"):
        p.require_fit()


def test_advice_values_really_fit():
    # 8 rows of 2048 tokens without checkpointing does not fit 80 GB; the advised micro-batch must.
    cfg = run_cfg(ckpt=False, mbs=8)
    p = plan_for_config(cfg, 8, 1)
    assert not p.fits
    mbs = [int(m.group(1)) for a in p.advice if (m := re.match(r"data\.micro_batch_size=(\d+)", a))]
    assert mbs and "(fits)" in next(a for a in p.advice if a.startswith("data.micro_batch_size"))
    cfg.data.micro_batch_size = mbs[0]
    assert plan_for_config(cfg, 8, 1).fits
    cfg.data.micro_batch_size = mbs[0] + 1
    assert not plan_for_config(cfg, 8, 1).fits  # and it is the largest that fits


def test_checkpointing_reduces_activations():
    with_ckpt = plan_for_config(run_cfg(ckpt=True), 8, 1)
    without = plan_for_config(run_cfg(ckpt=False), 8, 1)
    assert with_ckpt.activations_checkpointed_gib < with_ckpt.activations_full_gib / 5
    assert with_ckpt.activations_gib < without.activations_gib and with_ckpt.total_gib < without.total_gib


def test_more_gpus_reduce_per_gpu_model_states():
    states = [plan_for_config(run_cfg(), 8, nodes).model_states_gib for nodes in (1, 2, 4)]
    assert states[0] > states[1] > states[2]
    acts = {plan_for_config(run_cfg(), 8, nodes).activations_gib for nodes in (1, 2, 4)}
    assert len(acts) == 1  # activations are per micro-batch, not sharded


def test_eager_attention_is_quadratic_and_packing_counts_tokens():
    flash = plan_for_config(run_cfg(ckpt=False, mbs=1, max_length=4096), 8, 1)
    eager = plan_for_config(run_cfg(ckpt=False, mbs=1, max_length=4096, attn="eager"), 8, 1)
    assert eager.activations_full_gib > 1.5 * flash.activations_full_gib
    packed = plan_for_config(run_cfg(packing=True, max_tokens=8192, mbs=1), 8, 1)
    assert packed.inputs.tokens == 8192


def test_tiny_config_and_lora():
    tiny = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    p = plan_for_config(run_cfg(tiny=tiny, mbs=2, max_length=256, gpu_gb=4.0), 2, 1)
    assert p.inputs.counts.total == count_parameters(model_config_for(NS(architecture=None, tiny=tiny))).total
    assert p.fits and "tiny llama" in p.render()
    lora = plan_for_config(run_cfg(tiny=tiny, lora=True), 2, 1)
    # q_proj 64->64 and v_proj 64->32 in 2 layers at r=16, plus the 3-class head
    assert lora.trained_params == 2 * 16 * ((64 + 64) + (64 + 32)) + (64 * 3 + 3)
    assert lora.deepspeed_ratio is None and "not comparable" in lora.render()


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    config = tiny_gemma2_config()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    peft_model = get_peft_model(AutoModel.from_config(config), LoraConfig(r=8, target_modules=list(targets)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    from training.plan import lora_params

    assert lora_params(count_parameters(config), targets, 8) == trainable


# ------------------------------------------------------------------------------------------------ activations


def measured_saved_bytes(model, **inputs) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("family,attn,layout", [
    ("llama", "sdpa", "one"), ("llama", "sdpa", "padded"), ("llama", "sdpa", "packed"), ("llama", "eager", "padded"),
    ("llama", "eager", "packed"), ("gemma2", "eager", "one"), ("gemma2", "eager", "padded"), ("gemma2", "eager", "packed"),
])
def test_activation_formula_matches_saved_tensors(family, attn, layout):
    from transformers import AutoModel

    config = tiny_llama_config() if family == "llama" else tiny_gemma2_config()
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation=attn, dtype=torch.bfloat16).train()
    length, rows = 96, (2 if layout == "padded" else 1)
    ids = torch.randint(3, 1000, (rows, length))
    inputs = {"input_ids": ids}
    if layout == "padded":  # real padding, so transformers keeps the mask
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[1, 70:] = 0
        inputs["attention_mask"] = mask
    if layout == "packed":  # three examples in one row, positions restarting (PLATFORM.md)
        inputs["position_ids"] = torch.cat([torch.arange(n) for n in (40, 30, 26)])[None]
    measured = measured_saved_bytes(model, **inputs)
    shape = Shape.of(config, family)
    attended = length  # one row either way: padded rows attend over length, packed rows over the packed length
    mask = {"one": "none", "padded": "shared", "packed": "per_layer"}[layout]
    expected = saved_activation_bytes(shape, 2, attn, rows * length, attended, mask, checkpointing=False)
    assert abs(measured / expected - 1) < 0.03, (measured, expected)


def test_checkpointed_activation_formula_matches_saved_tensors():
    from transformers import AutoModel

    config = tiny_llama_config()
    config.num_hidden_layers = 4
    model = AutoModel.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    measured = measured_saved_bytes(model, input_ids=torch.randint(3, 1000, (1, 128)))
    shape = Shape.of(config, "llama")
    expected = saved_activation_bytes(shape, 2, "sdpa", 128, 128, "none", checkpointing=True)
    full = saved_activation_bytes(shape, 2, "sdpa", 128, 128, "none", checkpointing=False)
    # RoPE cos/sin are held by the checkpoint frames (not autograd), hence the looser bound.
    assert abs(measured / expected - 1) < 0.15 and measured < full / 2


def test_config_errors_are_clear():
    cfg = run_cfg(ds="configs/deepspeed/nope.json")
    with pytest.raises(ValueError, match="nope.json"):
        inputs_from_config(cfg, 8, 1)
    with pytest.raises(ValueError, match="--gpus"):
        inputs_from_config(run_cfg(), 0, 1)
    assert set(ARCHITECTURES) == {"gemma2-9b", "llama3-8b", "deberta-v3-large", "minilm-l6"}


def test_every_preset_plans_through_the_run_config_loader():
    """The real presets, parsed by training.config (T1's loader), plan and fit the hardware they were written for."""
    from pathlib import Path

    from training.config import load_config

    root = Path(__file__).resolve().parents[1]
    presets = sorted(p for p in (root / "configs").rglob("*.yaml"))
    assert any(p.name == "9b_full.yaml" and p.parent.name == "gemma2" for p in presets)
    for path in presets:
        cfg = load_config(path, check_files=False)
        p = plan_for_config(cfg, gpus_per_node=8, nodes=1)
        assert p.fits, f"{path}:\n{p.render()}"
        if path.parent.name == "gemma2" and path.name == "9b_full.yaml":
            assert 0.9 <= p.deepspeed_ratio <= 1.1
