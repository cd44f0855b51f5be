"""GPU smoke check: the paths CI cannot run (flash-attention 2, bf16 on CUDA, bitsandbytes on a GPU, ZeRO-3 on
CUDA, worker placement), in one script for the first GPU at hand. No network: every model is built from its config
with random weights, every data file is synthetic. Aim: under 8 minutes on one GPU.

    python bench/gpu_smoke.py                 # on a machine with a CUDA GPU; last line: one JSON object
    python bench/gpu_smoke.py --only 1,2      # some sections
    python bench/gpu_smoke.py --allow-cpu     # exercise the script's own logic on a CPU (GPU-only parts skipped)

Sections:
  1 versions, flash-attn / bitsandbytes / DeepSpeed CPU-Adam availability
  2 packed flash-attention 2 logits and gradients vs each example alone (eager), bf16: tiny Gemma2 (soft-capping,
    sliding window shorter than the sequences) and tiny Llama
  3 tiny end-to-end training with packing + flash-attention, stopped and resumed: losses equal an uninterrupted
    run; the same with LoRA
  4 ZeRO-3 loading of a saved random model with Gemma2-9B layer shapes (2 layers): gathered weights equal the saved
    ones; torch.cuda.max_memory_allocated next to the memory plan's figure
  5 arena-predict with none / 8bit / 4bit and fp16 / bf16: exit 0, no non-finite rows, probabilities close across
    dtypes, and no CUDA context in the parent process (one CUDA_VISIBLE_DEVICES per worker)
  6 arena-predict --parallel pipeline with both stages on the GPU at hand (cuda:0,cuda:0) vs --parallel data, fp16
On a CPU (without --allow-cpu) it exits at once with status 2 and a clear message.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = ROOT / "configs" / "tiny" / "llama_cpu.yaml"
LENGTHS = [37, 64, 21, 50]  # longer than the tiny Gemma2's sliding window (16)


def env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false"}


def has(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "present")
    except Exception:  # noqa: BLE001 (an import that fails for any reason means "not available")
        return None


# ------------------------------------------------------------------------------------------------------- sections
def versions(dev: str) -> dict:
    import deepspeed
    import peft
    import transformers

    cpu_adam = None
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        cpu_adam = bool(CPUAdamBuilder().is_compatible())
    except Exception as e:  # noqa: BLE001
        cpu_adam = f"unavailable: {e}"
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "peft": peft.__version__, "deepspeed": deepspeed.__version__, "flash_attn": has("flash_attn"),
           "bitsandbytes": has("bitsandbytes"), "deepspeed_cpu_adam": cpu_adam}
    if dev == "cuda":
        out.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return out


def packed_vs_alone(dev: str) -> dict:
    """Flash varlen over one packed row vs each example alone with eager attention, logits and input gradients."""
    from transformers import AutoModel

    from data.packing import check_packed_attention, collate_packed, packed_forward_kwargs
    from inference.modeling import ArenaClassifier
    from tests.conftest import tiny_gemma2_config, tiny_llama_config

    if dev != "cuda" or not has("flash_attn"):
        return {"skipped": "needs a CUDA GPU with flash-attn"}
    out = {}
    for family, cfg in (("gemma2", tiny_gemma2_config()), ("llama", tiny_llama_config())):
        check_packed_attention("flash_attention_2", family)
        torch.manual_seed(0)
        flash = ArenaClassifier(AutoModel.from_config(cfg, attn_implementation="flash_attention_2",
                                                      dtype=torch.bfloat16)).cuda()
        flash.reset_head()
        eager = ArenaClassifier(AutoModel.from_config(cfg, attn_implementation="eager", dtype=torch.bfloat16)).cuda()
        eager.load_state_dict(flash.state_dict())
        rng = np.random.default_rng(0)
        feats = [{"input_ids": rng.integers(3, 1000, n).tolist(), "label": i % 3} for i, n in enumerate(LENGTHS)]
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate_packed(feats).items()}
        packed = flash(**packed_forward_kwargs(batch, "flash_attention_2")).float()
        packed.sum().backward()
        g_packed = {n: p.grad.float().clone() for n, p in flash.named_parameters() if p.grad is not None}
        alone = torch.cat([eager(torch.tensor([f["input_ids"]], device="cuda")) for f in feats]).float()
        alone.sum().backward()
        g_alone = {n: p.grad.float() for n, p in eager.named_parameters() if p.grad is not None}
        grad_err = max(((g_packed[n] - g_alone[n]).abs().max() / (g_alone[n].abs().max() + 1e-6)).item()
                       for n in g_alone)
        logit_err = (packed - alone).abs().max().item()
        out[family] = {"max_logit_diff": logit_err, "max_rel_grad_diff": grad_err,
                       "ok": logit_err <= 2e-2 and grad_err <= 5e-2}  # bf16 tolerances
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def train_resume(dev: str, work: Path) -> dict:
    """arena-train on the GPU (packing + flash when available): stopped at step 6 and resumed == uninterrupted."""
    from data.synthetic import write_sample

    data = write_sample(work / "data", rows=400, seed=0, test_rows=40)
    packed = dev == "cuda" and has("flash_attn")
    common = ["--config", str(TINY), f"data.train_csv={data['train']}", "train.max_steps=12", "train.save_every=3",
              "train.eval_every=6", "deepspeed.config=configs/deepspeed/zero2.json",
              "deepspeed.param_persistence_threshold=null"]
    if packed:
        common += ["data.packing=true", "data.max_tokens=2048", "model.attn_implementation=flash_attention_2"]
    out = {"packing_flash": bool(packed)}
    for name, extra in (("full", []), ("lora", ["lora.enabled=true", "lora.r=4", "lora.alpha=8"])):
        try:
            out[name] = _train_resume_variant(work, common, name, extra)
        except Exception as e:  # noqa: BLE001 (one variant failing must not hide the other's result)
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[-1500:]}
    out["ok"] = out["full"]["ok"] and out["lora"]["ok"]
    return out


def _train_resume_variant(work: Path, common: list[str], name: str, extra: list[str]) -> dict:
    """One variant (full or LoRA): straight, stopped at step 6, resumed; the losses must match."""
    runs = {}
    for kind, args in (("straight", []), ("stopped", ["train.stop_after_steps=6"]), ("resumed", [])):
        run_dir = work / f"{name}_{'straight' if kind == 'straight' else 'resume'}"
        r = subprocess.run([sys.executable, "-m", "training", *common, *extra, f"output_dir={run_dir}", *args],
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"{name}/{kind} exit {r.returncode}: {r.stderr[-1500:]}")
        runs[kind] = run_dir
    losses = {k: [json.loads(x)["loss"] for x in (runs[k] / "metrics.jsonl").read_text().splitlines() if x]
              for k in ("straight", "resumed")}
    diff = float(np.max(np.abs(np.asarray(losses["straight"]) - np.asarray(losses["resumed"]))))
    return {"steps": len(losses["resumed"]), "max_loss_diff": diff, "ok": diff <= 1e-5}


def zero3_load(dev: str, work: Path, layers: int = 2) -> dict:
    """A random model with Gemma2-9B layer shapes, saved, then loaded partitioned under ZeRO-3 (one process)."""
    import deepspeed
    from safetensors.torch import load_file
    from transformers import AutoModel, Gemma2Config
    from transformers.integrations import HfDeepSpeedConfig

    from training.config import deepspeed_config, load_config
    from training.plan import plan_for_config

    if dev != "cuda":
        return {"skipped": "needs a CUDA GPU"}
    cfg9b = Gemma2Config(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                         sliding_window=4096)
    src = work / "gemma2_9b_shapes"
    torch.manual_seed(0)
    AutoModel.from_config(cfg9b, dtype=torch.bfloat16).save_pretrained(src)
    saved = {}
    for f in sorted(src.glob("*.safetensors")):
        saved.update(load_file(str(f)))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    torch.cuda.set_device(0)  # as training.distributed does: zero.Init places partitions on the current device
    deepspeed.init_distributed(dist_backend="nccl")
    cfg = load_config(str(ROOT / "configs" / "gemma2" / "9b_full.yaml"),
                      [f"model.name_or_path={src}", "output_dir=" + str(work / "z3"), f"data.train_csv={TINY}"],
                      check_files=False)
    ds_config = deepspeed_config(cfg, world_size=1, hidden_size=3584, bf16=True)
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must outlive the load)
    torch.cuda.reset_peak_memory_stats()
    model = AutoModel.from_pretrained(src, dtype=torch.bfloat16)
    peak_load = torch.cuda.max_memory_allocated() / 2**30
    mismatched, checked = [], 0
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            ref = saved.get(name) if name in saved else saved.get(f"model.{name}")
            if ref is None:
                continue
            checked += 1
            if not torch.equal(p.detach().cpu(), ref):
                mismatched.append(name)
    plan = plan_for_config(cfg, gpus_per_node=1)
    return {"layers": layers, "tensors_checked": checked, "mismatched": mismatched[:5],
            "peak_load_gib": round(peak_load, 2), "plan_params_gib": round(plan.params_gib, 2),
            "plan_total_gib": round(plan.total_gib, 2), "ok": checked > 0 and not mismatched}


def tiny_export(work: Path) -> tuple[dict, Path]:
    """(synthetic sample files, a tiny random Llama classifier export) under `work`, made once per run."""
    from data.synthetic import write_sample
    from data.template import FormatConfig
    from data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from inference.modeling import save_pretrained
    from tests.conftest import tiny_classifier

    data = write_sample(work / "pdata", rows=40, seed=1, test_rows=64)
    export = work / "export"
    if not (export / "config.json").exists():
        train_bpe_tokenizer((f"prompt {i} response words" for i in range(200)), work / "tok", vocab_size=1024)
        save_pretrained(tiny_classifier("llama"), load_tokenizer(work / "tok"), export,
                        FormatConfig(max_length=256).to_dict(), prior=[0.35, 0.35, 0.3])
    return data, export


def predict_matrix(dev: str, work: Path) -> dict:
    """arena-predict on one GPU for every quantization x dtype; the parent process must hold no CUDA context."""
    data, export = tiny_export(work)
    device = "cuda:0" if dev == "cuda" else "cpu"
    dtypes = ("fp16", "bf16") if dev == "cuda" and torch.cuda.get_device_capability(0)[0] >= 8 else (
        ("fp16",) if dev == "cuda" else ("fp32",))
    quant = ("none", "8bit", "4bit") if has("bitsandbytes") else ("none",)
    out, probs = {}, {}
    for q in quant:
        for dt in dtypes:
            sub = work / f"sub_{q}_{dt}.csv"
            cmd = [sys.executable, "-m", "inference", "--model", str(export), "--test", str(data["test"]),
                   "--out", str(sub), "--devices", device, "--quantize", q, "--dtype", dt, "--time-budget", "10m"]
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), "ARENA_DEBUG_SLEEP_PER_BATCH": "0.5"},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            parent_on_gpu = False
            while proc.poll() is None:
                parent_on_gpu |= proc.pid in gpu_pids()
                time.sleep(0.5)
            _, err = proc.communicate()
            rows = read_probs(sub)
            key = f"{q}/{dt}"
            probs[key] = rows
            out[key] = {"exit": proc.returncode, "non_finite_rows": int((~np.isfinite(rows).all(1)).sum()),
                        "parent_cuda_context": parent_on_gpu}
            if proc.returncode != 0:
                out[key]["stderr"] = err[-800:]
            print(f"   predict {key}: {json.dumps(out[key])[:600]}", file=sys.stderr, flush=True)  # partial results
    base = probs[f"none/{dtypes[0]}"]
    for key, p in probs.items():
        out[key]["max_diff_vs_none"] = float(np.abs(p - base).max())
    out["ok"] = all(v["exit"] == 0 and v["non_finite_rows"] == 0 and not v["parent_cuda_context"]
                    and v["max_diff_vs_none"] < (0.05 if "none" in k else 0.1) for k, v in out.items())
    return out


def pipeline_vs_data(dev: str, work: Path) -> dict:
    """--parallel pipeline with two stage processes on the one GPU at hand (cuda:0,cuda:0: the CUDA code path of the
    stages, the device->host->device hand-over, fp16) against --parallel data on it; the CPU twin is
    tests/test_pipeline.py (cpu:2 vs cpu within 1e-5)."""
    data, export = tiny_export(work)
    devices = {"data": "cuda:0", "pipeline": "cuda:0,cuda:0"} if dev == "cuda" else {"data": "cpu",
                                                                                      "pipeline": "cpu:2"}
    dtype = "fp16" if dev == "cuda" else "fp32"
    out, probs = {}, {}
    for mode, device in devices.items():
        sub = work / f"sub_{mode}.csv"
        cmd = [sys.executable, "-m", "inference", "--model", str(export), "--test", str(data["test"]), "--out",
               str(sub), "--devices", device, "--parallel", mode, "--dtype", dtype, "--time-budget", "10m"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
        out[mode] = {"exit": r.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        if r.returncode != 0:
            out[mode]["stderr"] = r.stderr[-800:]
            continue
        probs[mode] = read_probs(sub)
    if len(probs) == 2:
        out["max_diff"] = float(np.abs(probs["pipeline"] - probs["data"]).max())
        out["non_finite_rows"] = int((~np.isfinite(probs["pipeline"]).all(1)).sum())
    tol = 2e-3 if dtype == "fp16" else 1e-5  # fp16 kernels may differ between a split and a whole model
    out["ok"] = len(probs) == 2 and out["non_finite_rows"] == 0 and out["max_diff"] <= tol
    return out


def gpu_pids() -> set[int]:
    try:
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {int(x) for x in text.split() if x.strip().isdigit()}


def read_probs(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        return np.asarray([[float(r[1]), float(r[2]), float(r[3])] for r in list(csv.reader(f))[1:]])


SECTIONS = {1: ("versions", versions), 2: ("packed_flash_attention", packed_vs_alone),
            3: ("train_resume", train_resume), 4: ("zero3_load", zero3_load), 5: ("predict", predict_matrix),
            6: ("pipeline", pipeline_vs_data)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="1,2,3,4,5,6", help="comma-separated section numbers (default: all)")
    p.add_argument("--allow-cpu", action="store_true", help="run on a CPU what can run there (script check)")
    p.add_argument("--workdir", help="keep the work files here (default: a temporary directory)")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.allow_cpu:
        print("gpu_smoke: no CUDA GPU visible (torch.cuda.is_available() is False): this check is for a GPU "
              "machine; --allow-cpu runs its CPU-capable parts", file=sys.stderr)
        print(json.dumps({"gpu": False, "ran": []}))
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"gpu": dev == "cuda"}
    t_all = time.perf_counter()
    for k in (int(x) for x in args.only.split(",")):
        name, fn = SECTIONS[k]
        t0 = time.perf_counter()
        try:
            res = fn(dev) if k in (1, 2) else fn(dev, work)
        except Exception as e:  # noqa: BLE001 (one failing section must not hide the others)
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        print(f"== {k} {name}: {json.dumps(res)[:2000]}", file=sys.stderr, flush=True)
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    results["all_ok"] = all(v.get("ok", True) for v in results.values() if isinstance(v, dict))
    print(json.dumps(results))
    return 0 if results["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
