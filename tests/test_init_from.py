"""Multi-stage training (model.init_from / model.init_head): config checks in-process, then real runs.

    stage1   one plain process (ZeRO-3, world of one): a tiny Llama trained 2 steps and exported
    keep     2 processes under torchrun, ZeRO-3 (partitioned load), init_from=stage1's export on the same validation
             fold, evaluated before the first update: the logits equal stage 1's val_predictions.npz
    reset    one plain process, init_from with a fresh MLP head (another head shape is fine with reset)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.test_training_distributed import LLAMA, launch, metrics, single_cmd, torchrun_cmd
from training.config import ConfigError, load_config

SOURCE = ["model.tiny=null", "data.tokenizer=null"]  # the preset's own backbone and BPE give way to the export's


def cfg_with(sample_dir, tmp_path, *overrides):
    return load_config(LLAMA, [f"data.train_csv={sample_dir / 'train.csv'}", f"output_dir={tmp_path / 'run'}",
                               *overrides])


# ---------------------------------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("overrides,message", [
    ([], "model.tiny: conflicts with model.init_from"),
    (["model.tiny=null", "model.name_or_path=/somewhere"], "model.name_or_path: conflicts with model.init_from"),
    (["model.tiny=null"], "data.tokenizer: train_bpe conflicts with model.init_from"),
    ([*SOURCE, "model.init_head=fresh"], "model.init_head: must be keep or reset"),
], ids=["tiny", "name_or_path", "train_bpe", "bad-init-head"])
def test_conflicting_settings_are_refused(tiny_export_dir, sample_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg_with(sample_dir, tmp_path, f"model.init_from={tiny_export_dir}", *overrides)


def test_init_head_without_init_from_is_refused(sample_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.init_head: only used with model.init_from"):
        cfg_with(sample_dir, tmp_path, "model.init_head=reset")


def test_the_source_must_be_a_complete_merged_export(tiny_export_dir, sample_dir, tmp_path):
    def refused(src, message):
        with pytest.raises(ConfigError, match=message):
            cfg_with(sample_dir, tmp_path, f"model.init_from={src}", *SOURCE)

    refused(tmp_path / "nowhere", "no such directory")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "arena.json is missing")
    adapter = shutil.copytree(tiny_export_dir, tmp_path / "adapter")
    meta = json.loads((adapter / "arena.json").read_text())
    (adapter / "arena.json").write_text(json.dumps({**meta, "adapter": True}))
    refused(adapter, "LoRA adapter export.*lora.merge_on_export=true")
    partial = shutil.copytree(tiny_export_dir, tmp_path / "partial")
    (partial / "model.safetensors").unlink()
    refused(partial, "incomplete export, missing model.safetensors")
    cfg = cfg_with(sample_dir, tmp_path, f"model.init_from={tiny_export_dir}", *SOURCE)  # the good one passes
    assert cfg.model.init_from == str(tiny_export_dir) and cfg.model.init_head == "keep"


def test_keep_needs_a_head_of_the_same_shape(tiny_export_dir, sample_dir, tmp_path):
    mlp = [f"model.init_from={tiny_export_dir}", *SOURCE, "model.head.type=mlp", "model.head.mlp_hidden=32"]
    with pytest.raises(ConfigError) as e:
        cfg_with(sample_dir, tmp_path, *mlp)
    # both shapes named: the export's linear head and this run's MLP
    assert "model.init_head=keep" in str(e.value) and "1.weight [3, 64]" in str(e.value)
    assert "1.weight [32, 64]" in str(e.value) and "3.weight [3, 32]" in str(e.value)
    assert cfg_with(sample_dir, tmp_path, *mlp, "model.init_head=reset").model.head.type == "mlp"
    with pytest.raises(ConfigError, match="pooling: the export's head reads the last token"):
        cfg_with(sample_dir, tmp_path, f"model.init_from={tiny_export_dir}", *SOURCE, "model.head.pooling=first")


def test_the_cli_reports_a_conflict_in_one_line(tiny_export_dir, sample_dir, tmp_path, capsys):
    from training.cli import main

    code = main(["--config", str(LLAMA), f"data.train_csv={sample_dir / 'train.csv'}", f"output_dir={tmp_path}",
                 f"model.init_from={tiny_export_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model.tiny=null" in err


def test_a_tokenizer_larger_than_the_exports_embeddings_is_refused(tiny_export_dir, sample_dir, tmp_path):
    from training.model import hf_config

    class Tokenizer:  # only its size matters here
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    cfg = cfg_with(sample_dir, tmp_path, f"model.init_from={tiny_export_dir}", *SOURCE)
    assert hf_config(cfg, Tokenizer(1024)).vocab_size == 1024  # the export's own config
    with pytest.raises(ConfigError, match="data.tokenizer: 1025 tokens, but the embeddings .* hold 1024"):
        hf_config(cfg, Tokenizer(1025))


def test_the_memory_plan_reads_the_shape_from_the_export(tiny_export_dir, sample_dir, tmp_path):
    from training.plan import plan_for_config

    cfg = cfg_with(sample_dir, tmp_path, f"model.init_from={tiny_export_dir}", *SOURCE)
    plan = plan_for_config(cfg, gpus_per_node=1)  # GPU runs check it before starting
    assert plan.fits and str(tiny_export_dir) in plan.render()


def test_format_differences_name_each_changed_key():
    from data.template import FormatConfig
    from training.init_from import format_differences

    a = FormatConfig(max_length=256).to_dict()
    assert format_differences(a, dict(a)) == []
    assert format_differences(a, FormatConfig(max_length=512).to_dict()) == ["max_length: 256 -> 512"]


def test_eval_at_start_needs_a_validation_set(sample_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.eval_at_start"):
        cfg_with(sample_dir, tmp_path, "train.eval_at_start=true", "data.valid_fold=null", "train.export=last",
                 "train.eval_every=0")


# ---------------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def stage1(sample_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1") / "run"
    launch(single_cmd(["--config", str(LLAMA), f"data.train_csv={sample_dir / 'train.csv'}", f"output_dir={out}",
                       "train.max_steps=2", "train.eval_every=0", "train.save_every=0"]))
    return out


def stage2_args(stage1: Path, sample_dir, out: Path, *extra: str) -> list[str]:
    return ["--config", str(LLAMA), f"data.train_csv={sample_dir / 'train.csv'}", f"output_dir={out}", *SOURCE,
            f"model.init_from={stage1 / 'final'}", "train.eval_at_start=true", "train.max_steps=1",
            "train.eval_every=0", "train.save_every=0", *extra]


@pytest.mark.distributed
def test_zero3_init_from_reproduces_the_source_logits_before_the_first_update(stage1, sample_dir, tmp_path):
    out = tmp_path / "stage2"
    launch(torchrun_cmd(stage2_args(stage1, sample_dir, out)))
    source, start = np.load(stage1 / "val_predictions.npz"), np.load(out / "val_predictions_start.npz")
    assert np.array_equal(source["ids"], start["ids"]) and len(start["ids"]) > 0  # the same validation fold
    np.testing.assert_allclose(start["logits"], source["logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(start["logits_swap"], source["logits_swap"], rtol=0, atol=1e-5)
    src_meta = json.loads((stage1 / "final" / "arena.json").read_text())
    assert metrics(out)[0]["step"] == 0 and metrics(out)[0]["val_logloss"] == pytest.approx(src_meta["val_logloss"])
    # loaded partitioned: each of the 2 ranks holds about half of the parameters
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    assert all(r["local_numel"] < 0.6 * r["full_numel"] for r in info["params_per_rank"])
    # where it started: config, run_info and the new export
    origin = {"path": str((stage1 / "final").resolve()), "step": 2, "val_logloss": src_meta["val_logloss"],
              "init_head": "keep", "init_from": None}
    assert info["init_from"] == origin
    assert json.loads((out / "final" / "arena.json").read_text())["init_from"] == origin
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["init_from"] == str(stage1 / "final")
    assert [r["step"] for r in metrics(out)] == [0, 1] and np.isfinite(metrics(out)[1]["loss"])


@pytest.mark.distributed
def test_one_process_init_from_with_a_fresh_head_of_another_shape(stage1, sample_dir, tmp_path):
    out = tmp_path / "reset"
    launch(single_cmd(stage2_args(stage1, sample_dir, out, "model.init_head=reset", "model.head.type=mlp")))
    source, start = np.load(stage1 / "val_predictions.npz"), np.load(out / "val_predictions_start.npz")
    assert np.abs(start["logits"] - source["logits"]).max() > 1e-3  # a new head: other logits from the start
    meta = json.loads((out / "final" / "arena.json").read_text())
    assert meta["head"]["type"] == "mlp" and meta["init_from"]["init_head"] == "reset"
    assert meta["init_from"]["path"] == str((stage1 / "final").resolve())
