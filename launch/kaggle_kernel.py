"""Kaggle inference notebook for "LLM Classification Finetuning" (paste into a notebook cell or run as a script).

Attach three inputs to the notebook: the competition data, the wheelhouse dataset built by
launch/build_wheelhouse.sh, and the exported model directory (or directories) written by arena-train; then set the
paths below. Turn the internet off, select "GPU T4 x2", and "Save Version" (Save & Run All). The notebook
installs the wheels offline, detects the GPUs, and runs arena-predict with a time budget computed from the
notebook's start, writing /kaggle/working/submission.csv. A valid submission exists from the first seconds of
arena-predict onwards; if the run itself fails, this script still leaves a prior-filled file.

Locally (tests, dry runs) every constant can be overridden by an environment variable of the same name with the
prefix ARENA_ (e.g. ARENA_TEST_CSV, ARENA_MODELS as a comma-separated list, ARENA_WHEELHOUSE="" to skip pip).
"""
import time

KERNEL_START = time.time()  # the Kaggle limit counts from the notebook's start, pip install included

# --- paths and settings (edit these) -------------------------------------------------------------------------
WHEELHOUSE = "/kaggle/input/arena-wheelhouse"  # dataset made by launch/build_wheelhouse.sh ("" to skip installing)
MODELS = ["/kaggle/input/arena-gemma2-9b/export"]  # exported model dirs; several = an ensemble
WEIGHTS = []  # ensemble weights, one per model in MODELS order (empty: equal); paste arena-data blend's "weights"
BASE_MODELS = []  # base-model dirs for LoRA-adapter exports (one for all, or one per model)
TEST_CSV = "/kaggle/input/llm-classification-finetuning/test.csv"
OUT = "/kaggle/working/submission.csv"
QUANTIZE = "4bit"  # "none" | "8bit" | "4bit": a 9B model needs 8bit or 4bit on a 16 GB T4
PARALLEL = "data"  # "data": a model copy per T4 | "pipeline": one fp16 model split by layers over both T4s (a 9B
# model fits without quantization loss; set QUANTIZE = "none" with it, arena-predict refuses a quantized pipeline)
TTA = "auto"  # A/B-swapped views, most uncertain rows first: "auto" (as many as the budget fits), "on", "off", "0.33"
MAX_LENGTH = 0  # 0: the model's training max_length
BATCH_TOKENS = 0  # 0: arena-predict's default for the device
KAGGLE_LIMIT_HOURS = 9.0  # the competition's run-time limit
SAFETY_MINUTES = 15.0  # kept back for the notebook to finish and Kaggle to collect the file
FAIL_ON_ERROR = True  # bad paths/options stop the notebook (you see it at "Save Version"), not a silent prior file
EXTRA_ARGS = []  # more arena-predict flags, e.g. ["--log-level", "DEBUG"]
# -------------------------------------------------------------------------------------------------------------

import csv  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

EXIT_OK, EXIT_USAGE, EXIT_DEGRADED = 0, 2, 3


def setting(name, default):
    """A constant above, or its ARENA_<NAME> environment override (lists comma-separated)."""
    raw = os.environ.get(f"ARENA_{name}")
    if raw is None:
        return default
    if isinstance(default, list):
        return [x for x in raw.split(",") if x]
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes")
    return type(default)(raw)


def offline_env():
    """No network on a scored run: make every Hugging Face library fail fast instead of retrying downloads."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return env


def install(wheelhouse):
    """Install the project and its missing dependencies from the attached wheelhouse (no index, no network).

    torch is not in the wheelhouse: the GPU image's CUDA torch satisfies the requirement and is left alone.
    """
    if not wheelhouse:
        print("kernel: no wheelhouse given, using the installed packages")
        return
    if not os.path.isdir(wheelhouse):
        raise SystemExit(f"kernel: wheelhouse {wheelhouse} not found: attach the dataset built by build_wheelhouse.sh")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheelhouse, "--quiet",
           "--disable-pip-version-check", "arena-pref", "bitsandbytes", "accelerate"]
    print("kernel: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=offline_env())


def detect_devices():
    """'cuda:0,cuda:1' on a T4 x2 notebook, 'cpu' when no GPU is attached (slow: only for the public 3-row run)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                         capture_output=True, text=True, env=offline_env())
    n = int(out.stdout.strip() or 0) if out.returncode == 0 else 0
    if n == 0:
        print("kernel: WARNING: no GPU visible; running on the CPU", flush=True)
        return "cpu"
    return ",".join(f"cuda:{i}" for i in range(n))


def budget_seconds(limit_hours, safety_minutes):
    """What is left of the Kaggle limit for arena-predict."""
    left = limit_hours * 3600 - (time.time() - KERNEL_START) - safety_minutes * 60
    if left < 300:
        raise SystemExit(f"kernel: only {left:.0f}s of the time limit left; raise KAGGLE_LIMIT_HOURS or lower SAFETY")
    return int(left)


def tta_flags(value):
    """arena-predict's TTA flags for the TTA setting; True/False (older notebooks) and 1/0 mean on/off."""
    v = str(value).strip().lower()
    if v in ("0", "false", "no", "off"):
        return ["--no-tta"]
    return ["--tta", "on" if v in ("1", "true", "yes") else v]


def predict_command(devices, budget):
    cmd = [sys.executable, "-m", "inference", "--test", setting("TEST_CSV", TEST_CSV), "--out", setting("OUT", OUT),
           "--devices", devices, "--time-budget", str(budget), "--quantize", setting("QUANTIZE", QUANTIZE),
           "--parallel", setting("PARALLEL", PARALLEL),
           *tta_flags(setting("TTA", TTA))]
    for m in setting("MODELS", MODELS):
        cmd += ["--model", m]
    weights = setting("WEIGHTS", WEIGHTS)
    if weights:
        cmd += ["--weights", ",".join(str(w) for w in weights)]
    for b in setting("BASE_MODELS", BASE_MODELS):
        cmd += ["--base-model", b]
    if setting("MAX_LENGTH", MAX_LENGTH):
        cmd += ["--max-length", str(setting("MAX_LENGTH", MAX_LENGTH))]
    if setting("BATCH_TOKENS", BATCH_TOKENS):
        cmd += ["--batch-tokens", str(setting("BATCH_TOKENS", BATCH_TOKENS))]
    return cmd + list(setting("EXTRA_ARGS", EXTRA_ARGS))


def last_resort(test_csv, out):
    """A uniform submission from test.csv alone (only used when arena-predict could not even start)."""
    with open(test_csv, newline="", encoding="utf-8", errors="replace") as f:
        ids = [row["id"] for row in csv.DictReader(f)]
    tmp = out + ".tmp"
    with open(tmp, "w", newline="") as f:
        f.write("id,winner_model_a,winner_model_b,winner_tie\n")
        for i in ids:
            f.write(f"{i},{1 / 3!r},{1 / 3!r},{1 / 3!r}\n")
    os.replace(tmp, out)
    print(f"kernel: wrote a uniform submission for {len(ids)} rows to {out}", flush=True)


def main():
    install(setting("WHEELHOUSE", WHEELHOUSE))
    devices = detect_devices()
    budget = budget_seconds(setting("KAGGLE_LIMIT_HOURS", KAGGLE_LIMIT_HOURS), setting("SAFETY_MINUTES", SAFETY_MINUTES))
    cmd = predict_command(devices, budget)
    print("kernel: " + " ".join(cmd), flush=True)
    if os.environ.get("ARENA_DRY_RUN") == "1":
        return 0
    code = subprocess.run(cmd, env=offline_env()).returncode  # a crash in there cannot take this process down
    out = setting("OUT", OUT)
    if code == EXIT_OK:
        print("kernel: submission complete", flush=True)
    elif code == EXIT_DEGRADED:
        print("kernel: submission written but degraded (see the arena-predict messages above)", flush=True)
    else:
        if not os.path.exists(out):
            last_resort(setting("TEST_CSV", TEST_CSV), out)
        if setting("FAIL_ON_ERROR", FAIL_ON_ERROR) and code == EXIT_USAGE:
            raise SystemExit(f"kernel: arena-predict failed on its inputs (exit {code}); fix the paths above")
        print(f"kernel: arena-predict exited with {code}; {out} holds what was scored (prior elsewhere)", flush=True)
    return 0


if __name__ == "__main__":
    main()
