"""Real multi-process training runs on the CPU (gloo), one launch per scenario, shared between assertions.

    llama   `deepspeed --num_gpus 2 --module training` (tiny Llama preset): loss goes down, every parameter changes,
            parameters really partitioned, export == training model, report + temperature + prior
    resume  the same run SIGKILLed mid-way and resumed with resume=auto: the loss curve equals the uninterrupted one
    gemma2  `torchrun --nproc_per_node 2 -m training` (tiny Gemma2 preset: eager, MLP head, full swap): same checks
    lora    one plain process (`python -m training`), LoRA kept as an adapter: only adapter + head change
    nan     one plain process with an absurd learning rate: a clear error, the last good checkpoint kept

On a machine without GPUs the `deepspeed` launcher still starts N CPU processes with --num_gpus N (it sets
CUDA_VISIBLE_DEVICES, which nothing reads there); DeepSpeed picks its CPU accelerator and we use gloo. The first
DeepSpeed launch on a machine compiles a shared-memory communication op (~80 s, cached in ~/.cache/torch_extensions).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "configs" / "tiny" / "llama_cpu.yaml"
GEMMA2 = ROOT / "configs" / "tiny" / "gemma2_cpu.yaml"
STEPS = 30
COMMON = [f"train.max_steps={STEPS}", "train.save_every=10", "train.eval_every=10", "train.keep_checkpoints=3"]
TIMEOUT = 900

pytestmark = pytest.mark.distributed


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env() -> dict:
    # OMP_NUM_THREADS=1: two processes on two cores, each with all threads, are ~30% slower (PLATFORM.md)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "offline"}


def deepspeed_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", _port(),
            "--module", "training", *args]


def torchrun_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(),
            "-m", "training", *args]


def single_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "training", *args]


def launch(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def args_for(preset: Path, csv: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(preset), f"data.train_csv={csv}", f"output_dir={out}", *COMMON, *extra]


# ---------------------------------------------------------------------------------------------------- shared checks


def check_loss_goes_down(run: Path, margin: float) -> None:
    """Mean loss of the last 10 of 30 steps below that of the first 10. On this data a from-scratch tiny model
    learns the planted signal after ~100 steps; within 30 it mostly sheds its random start (Llama: ~1.19 -> ~1.09;
    Gemma2 with full swap, whose MLP head starts at ~ln 3: ~1.109 -> ~1.099; it learns the signal after ~70 steps,
    val log loss 0.66 at step 150)."""
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    loss = [r["loss"] for r in rows]
    assert all(np.isfinite(loss))
    first, last = np.mean(loss[:10]), np.mean(loss[-10:])
    assert last < first - margin, (first, last, loss)
    assert [r["step"] for r in rows if "val_logloss" in r] == [10, 20, 30]


def check_partitioned(run: Path) -> None:
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    ranks = info["params_per_rank"]
    full = ranks[0]["full_numel"]
    for r in ranks:
        # every rank holds about half of the parameters: ZeRO-3 really shards them (persistence threshold 0)
        assert r["local_numel"] < 0.6 * full, ranks
    assert sum(r["local_numel"] for r in ranks) >= full
    shards = sorted(p.name for p in (run / "checkpoints" / "step_00000010").glob("zero_pp_rank_*_model_states.pt"))
    assert len(shards) == 2, shards


def fp32_checkpoint(run: Path, step: int) -> dict[str, torch.Tensor]:
    """A checkpoint's full weights, reassembled from the ZeRO shards with DeepSpeed's offline zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step_{step:08d}")


def check_every_parameter_changes(run: Path) -> None:
    a, b = fp32_checkpoint(run, 10), fp32_checkpoint(run, 20)
    assert set(a) == set(b) and any(k.startswith("head.") for k in a)
    unchanged = [k for k in a if torch.equal(a[k], b[k])]
    assert not unchanged, unchanged


def check_export_matches_training_model(run: Path, csv: Path) -> dict:
    """The exported dir (loaded without training/) gives the logits the training engine gave on the validation rows."""
    from data.batching import collate_padded
    from data.dataset import tokenized_dataset
    from data.template import FormatConfig
    from data.tokenizer import load_tokenizer
    from inference.modeling import load_pretrained

    final = run / "final"
    model, meta = load_pretrained(final)
    preds = np.load(run / "val_predictions.npz")
    tok = load_tokenizer(final)
    ds = tokenized_dataset(csv, tok, FormatConfig.from_dict(meta["format"]), progress=False)
    where = {rid: i for i, rid in enumerate(ds["id"])}
    rows = ds[[where[rid] for rid in preds["ids"]]]
    assert np.array_equal(np.asarray(rows["label"]), preds["labels"])
    logits = []
    with torch.no_grad():
        for s in range(0, len(preds["ids"]), 16):
            b = collate_padded([{"input_ids": x, "label": y} for x, y in
                                zip(rows["input_ids"][s:s + 16], rows["label"][s:s + 16])], tok.pad_token_id)
            logits.append(model(b["input_ids"], b["attention_mask"]).numpy())
    np.testing.assert_allclose(np.concatenate(logits), preds["logits"], atol=1e-5, rtol=1e-4)
    # calibration and prior travel with the export; the report was written from the same predictions
    info = json.loads((run / "run_info.json").read_text())
    assert meta["prior"] == pytest.approx(info["prior"]) and sum(meta["prior"]) == pytest.approx(1.0)
    assert meta["temperature"] > 0
    best = min((r for r in metrics(run) if "val_logloss" in r), key=lambda r: r["val_logloss"])
    assert meta["step"] == best["step"] and meta["val_logloss"] == pytest.approx(best["val_logloss"])
    assert (run / "report" / "report.md").exists()
    return meta


# ---------------------------------------------------------------------------------------------------- llama + resume


@pytest.fixture(scope="module")
def llama_run(sample_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama") / "run"
    launch(deepspeed_cmd(args_for(LLAMA, sample_dir / "train.csv", out)))
    return out


def test_llama_zero3_learns_and_every_parameter_changes(llama_run):
    check_loss_goes_down(llama_run, margin=0.05)
    check_every_parameter_changes(llama_run)


def test_llama_parameters_are_partitioned(llama_run):
    check_partitioned(llama_run)


def test_llama_export_matches_training_model(llama_run, sample_dir):
    meta = check_export_matches_training_model(llama_run, sample_dir / "train.csv")
    assert meta["adapter"] is False


def test_kill_and_resume_reproduces_the_loss_curve(llama_run, sample_dir, tmp_path):
    out = tmp_path / "run"
    args = args_for(LLAMA, sample_dir / "train.csv", out)
    # a real SIGKILL of the whole launcher process group once step 15 is logged (checkpoint 10 exists, a later
    # save may be in flight): the hard way a job dies on a cluster
    proc = subprocess.Popen(deepspeed_cmd(args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + TIMEOUT
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and any(r["step"] >= 15 for r in metrics(out)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-4000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(r["step"] for r in metrics(out))
    assert 15 <= killed_at < STEPS

    resumed = launch(deepspeed_cmd(args))
    assert "resumed from" in resumed.stderr
    ref, got = metrics(llama_run), metrics(out)
    assert [r["step"] for r in got] == [r["step"] for r in ref]  # rows of the lost steps were replaced, not kept
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in got], [r["grad_norm"] for r in ref], rtol=1e-5)
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in ref])
    val = lambda rows: [r["val_logloss"] for r in rows if "val_logloss" in r]  # noqa: E731
    np.testing.assert_allclose(val(got), val(ref), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- gemma2 (torchrun)


@pytest.fixture(scope="module")
def gemma2_run(sample_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma2") / "run"
    launch(torchrun_cmd(args_for(GEMMA2, sample_dir / "train.csv", out)))
    return out


def test_gemma2_zero3_learns_partitioned_and_exports(gemma2_run, sample_dir):
    check_loss_goes_down(gemma2_run, margin=0.001)
    check_partitioned(gemma2_run)
    check_every_parameter_changes(gemma2_run)
    meta = check_export_matches_training_model(gemma2_run, sample_dir / "train.csv")
    assert meta["head"]["type"] == "mlp"
    # full swap and accumulation: 2 ranks x 2 micro-batches x 2 battles x (example + its swap)
    assert metrics(gemma2_run)[0]["rows"] == 2 * 2 * 2 * 2


# ---------------------------------------------------------------------------------------------------- no oneDNN fp16


def test_zero3_on_a_cpu_without_fp16_keeps_the_configured_dtype(sample_dir, tmp_path):
    """Regression (issue 10): on CPUs whose oneDNN has no fp16 (AMD EPYC without avx512_fp16) DeepSpeed 0.19.8
    zero.Init ignored dtype=float32 and built the head in bf16, so deepspeed.initialize failed in defragment
    (mixed dtypes). The capability is forced off here, so the test means the same on every CPU."""
    out = tmp_path / "run"
    helper = ROOT / "tests" / "helpers" / "without_fp16.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(),
           str(helper), "training", *args_for(LLAMA, sample_dir / "train.csv", out)[:4],
           "train.max_steps=2", "train.eval_every=2", "train.save_every=2"]
    launch(cmd)
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    assert [r["dtypes"] for r in info["params_per_rank"]] == [["float32"], ["float32"]]
    from safetensors.torch import load_file

    for f in ("model.safetensors", "arena_head.safetensors"):
        assert {t.dtype for t in load_file(str(out / "final" / f)).values()} == {torch.float32}, f


# ---------------------------------------------------------------------------------------------------- LoRA, NaN


def test_lora_changes_only_adapter_and_head(sample_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    launch(single_cmd(["--config", str(LLAMA), f"data.train_csv={sample_dir / 'train.csv'}", f"output_dir={out}",
                       "train.max_steps=12", "train.save_every=4", "train.eval_every=4", "train.keep_checkpoints=3",
                       "lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.merge_on_export=false",
                       "wandb.enabled=true"]))  # WANDB_MODE=offline: the run is logged to output_dir/wandb
    assert (out / "wandb" / "latest-run").exists() and (out / "wandb_id").exists()
    a, b = fp32_checkpoint(out, 4), fp32_checkpoint(out, 8)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    lora_or_head = {k for k in a if ".lora_" in k or k.startswith("head.")}
    assert changed == lora_or_head and len(lora_or_head) == 2 + 2 * 7 * 2  # head + A/B of 7 projections x 2 layers
    # the adapter export points at the untouched base weights
    meta = check_export_matches_training_model(out, sample_dir / "train.csv")
    assert meta["adapter"] is True and Path(meta["base_model"]) == (out / "final" / "base").resolve()
    base = load_file(str(out / "final" / "base" / "model.safetensors"))
    for k, v in a.items():
        if ".base_layer." in k or (k.startswith("backbone.") and ".lora_" not in k):
            name = k.replace("backbone.base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(base[name].float(), v), name


def test_non_finite_update_stops_with_a_clear_error_and_keeps_the_checkpoint(sample_dir, tmp_path):
    out = tmp_path / "run"
    proc = launch(single_cmd(["--config", str(LLAMA), f"data.train_csv={sample_dir / 'train.csv'}",
                              f"output_dir={out}", "train.lr=1e30", "train.warmup_steps=0", "train.max_grad_norm=0",
                              "train.save_every=1", "train.eval_every=0"]), check=False)
    assert proc.returncode != 0
    assert "non-finite" in proc.stderr and "Last good checkpoint" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000001"
    assert not (out / "checkpoints" / "step_00000002").exists() and not (out / "final").exists()


def test_qlora_from_pretrained_dir_merges_into_a_plain_export(tiny_export_dir, sample_dir, tmp_path):
    """A pretrained backbone directory (model.name_or_path), 4-bit NF4 base (bitsandbytes on CPU), ZeRO-2: the
    export has dequantized base + merged LoRA weights, loads as an ordinary model and matches the training model."""
    from data.synthetic import write_sample

    valid = write_sample(tmp_path / "valid", rows=40, seed=11, test_rows=3)["train"]  # a separate labelled file
    out = tmp_path / "run"
    launch(single_cmd(["--config", str(LLAMA), f"data.train_csv={sample_dir / 'train.csv'}", f"output_dir={out}",
                       f"data.valid_csv={valid}", "model.tiny=null", f"model.name_or_path={tiny_export_dir}", f"data.tokenizer={tiny_export_dir}",
                       "lora.enabled=true", "lora.qlora=true", "deepspeed.config=configs/deepspeed/zero2.json",
                       "deepspeed.param_persistence_threshold=null", "train.max_steps=4", "train.eval_every=2",
                       "train.save_every=0"]))
    meta = check_export_matches_training_model(out, valid)
    assert json.loads((out / "run_info.json").read_text())["valid_rows"] == 40
    config = json.loads((out / "final" / "config.json").read_text())
    assert meta["adapter"] is False and "quantization_config" not in config
