"""Every preset under configs/ loads and validates; overrides, unknown keys, conflicts and DeepSpeed "auto" filling."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import ConfigError, RunConfig, apply_override, config_diff, deepspeed_config, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").rglob("*.yaml"))
DS_JSONS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))
TINY = ROOT / "configs" / "tiny" / "llama_cpu.yaml"


def test_presets_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in PRESETS}
    assert {"gemma2/9b_full.yaml", "llama3/8b_full.yaml", "gemma2/9b_lora.yaml", "tiny/llama_cpu.yaml",
            "tiny/gemma2_cpu.yaml"} <= names
    assert {p.name for p in DS_JSONS} >= {"zero3.json", "zero3_offload.json", "zero2.json"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_preset_loads_validates_and_says_how_to_run(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("training" in first or "arena-train" in first), first
    cfg = load_config(path, check_files=False)
    assert isinstance(cfg, RunConfig) and cfg.output_dir
    assert cfg.deepspeed.zero_stage in (2, 3)  # resolved from the JSON
    ds = deepspeed_config(cfg, world_size=8, hidden_size=64, bf16=True)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8
    if cfg.model.tiny:
        # tiny models only exercise sharding if their small parameters are partitioned too
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_deepspeed_jsons_fill_every_auto(path):
    cfg = load_config(TINY, [f"deepspeed.config={path}", "deepspeed.param_persistence_threshold=null"],
                      check_files=False)
    ds = deepspeed_config(cfg, world_size=2, hidden_size=64, bf16=False)
    assert "auto" not in json.dumps(ds)
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == cfg.train.max_grad_norm
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    if cfg.deepspeed.zero_stage == 3:
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640  # 10 x hidden
        assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)


def test_overrides_parse_yaml_values_and_nested_keys():
    cfg = load_config(TINY, ["train.lr=3e-4", "data.format.max_length=128", "lora.target_modules=[q_proj, v_proj]",
                             "model.tiny.hidden_size=32", "train.max_steps=null", "train.betas=[0.9, 0.95]"],
                      check_files=False)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # YAML reads 3e-4 as a string: parsed, not kept
    assert cfg.data.format.max_length == 128
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.model.tiny["hidden_size"] == 32 and cfg.model.tiny["model_type"] == "llama"
    assert cfg.train.max_steps is None and cfg.train.betas == (0.9, 0.95)


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("data.format.max_len=5", "data.format.max_len"),
    ("nonsense=1", "nonsense"),
    ("model.head.kind=mlp", "model.head.kind"),
])
def test_unknown_keys_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(TINY, [override], check_files=False)


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=2.5", "train.max_steps"),
    ("train.max_steps=ten", "train.max_steps"),
    ("model.gradient_checkpointing=yes please", "model.gradient_checkpointing"),
    ("train.lr=fast", "train.lr"),
    ("model.head.type=conv", "head.type"),
    ("data.format.max_length=4", "max_length"),
    ("train.lr", "key.sub=value"),
    ("train.lr.x=1", "'train.lr' is a value"),
])
def test_bad_values_fail_with_the_reason(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override], check_files=False)


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed.zero_stage=2"], "contradicts"),  # zero3.json says stage 3: never silently rewritten
    (["deepspeed.offload_optimizer=true"], "contradicts"),
    (["data.packing=true", "data.max_tokens=100"], "max_tokens"),
    (["data.max_tokens=4096"], "only used with data.packing"),
    (["lora.qlora=true"], "needs lora.enabled"),
    (["lora.enabled=true", "lora.qlora=true"], "ZeRO-3"),
    (["train.warmup_steps=5", "train.warmup_ratio=0.1"], "not both"),
    (["model.name_or_path=/x"], "exactly one"),
    (["model.tiny.vocab_size=10"], "tokenizer"),
    (["data.tokenizer=null"], "data.tokenizer"),
    (["model.attn_implementation=sdpa", "model.tiny.model_type=gemma2"], "soft-capping"),
    (["data.valid_fold=null"], "train.export"),
    (["data.valid_fold=null", "train.export=last", "train.eval_every=5"], "train.eval_every"),
    (["output_dir="], "output_dir"),
    (["model.dtype=fp16"], "model.dtype"),
])
def test_conflicting_settings_fail_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides, check_files=False)


def test_missing_files_are_named():
    with pytest.raises(ConfigError, match="data.train_csv: file not found"):
        load_config(TINY, ["data.train_csv=/nonexistent/train.csv"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")
    with pytest.raises(ConfigError, match="deepspeed.config"):
        load_config(TINY, ["deepspeed.config=/nonexistent.json"], check_files=False)


def test_concrete_json_values_must_agree(tmp_path):
    ds = json.loads((ROOT / "configs/deepspeed/zero3.json").read_text())
    ds["gradient_clipping"] = 0.5
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    cfg = load_config(TINY, [f"deepspeed.config={p}"], check_files=False)
    with pytest.raises(ConfigError, match="gradient_clipping=0.5 but the run config implies 1.0"):
        deepspeed_config(cfg, world_size=2, hidden_size=64, bf16=False)
    ds["gradient_clipping"] = "auto"
    ds["optimizer"] = {"type": "AdamW"}
    p.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(load_config(TINY, [f"deepspeed.config={p}"], check_files=False), 2, 64, False)


def test_to_dict_roundtrip_and_diff():
    cfg = load_config(TINY, check_files=False)
    raw = to_dict(cfg)
    assert config_diff(cfg, raw) == []
    other = load_config(TINY, ["train.lr=0.5", "train.stop_after_steps=3"], check_files=False)
    assert config_diff(cfg, other) == ["train.lr", "train.stop_after_steps"]


def test_apply_override_creates_sections():
    raw = {}
    apply_override(raw, "model.tiny.model_type=llama")
    apply_override(raw, "data.valid_csv=")
    assert raw == {"model": {"tiny": {"model_type": "llama"}}, "data": {"valid_csv": None}}


def test_cli_plan_prints_without_starting(capsys):
    from training.cli import main

    assert main(["--config", str(TINY), "--plan", "--gpus", "2"]) in (0, 1)
    assert capsys.readouterr().out.strip()


def test_cli_config_error_exit_code(capsys):
    from training.cli import main

    assert main(["--config", str(TINY), "train.nope=1", "--local_rank=0"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err


def test_cli_overrides_may_surround_options():
    from training.cli import parse_args

    # the deepspeed launcher puts --local_rank=N before the script's own arguments
    args = parse_args(["--local_rank=1", "--config", "x.yaml", "a.b=1", "--plan", "c=2", "--gpus", "4"])
    assert (args.config, args.plan, args.gpus, args.overrides) == ("x.yaml", True, 4, ["a.b=1", "c=2"])
