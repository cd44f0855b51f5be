"""`arena-predict` (= `python -m inference`): the command line of predict.py.

Exit status: 0 every row got the best treatment; 3 a valid submission was written but something was degraded
(fewer swapped views than --tta asked for, max_length shortened, rows given the prior, a worker lost; the messages
say which); 2 bad input or
options, or no worker could load the model (nothing scored; a prior-filled file may exist if the test file was
readable); 1 an unexpected error (the file holds the rows scored so far).
"""
from __future__ import annotations

import time

_T0 = time.monotonic()  # the time budget counts from process start, imports included

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

DESCRIPTION = """\
Predict P(A wins), P(B wins), P(tie) for every row of a Kaggle test.csv with exported arena models and write
submission.csv (id,winner_model_a,winner_model_b,winner_tie; ids in test order).

A valid submission exists from the first second (prior-filled, then rewritten atomically as rows are scored) and
the final file is always valid, whatever happens to the workers. One worker process per device, each with its
own model copy; rows are scored longest first in token-budget batches.

TTA (the A/B-swapped view, averaged with the first) is a second pass: every row first gets one view, then the
swapped views run most uncertain row first (highest entropy of the first view's probabilities), each at the
row's first-view max_length (the average stays exactly symmetric). When the projected finish overruns
--time-budget, the least uncertain swaps are dropped first, then the remaining first views get a shorter
max_length, and what is left at the deadline gets the training prior (arena.json "prior", else uniform).

--tta on      every row gets both views; fewer (budget, lost workers) is DEGRADED (exit 3)
--tta auto    the most uncertain rows get both views, as many as the projected finish allows: partial coverage
              is planned, said in a note, not degraded; DEGRADED only if admitted swaps were then lost (the
              deadline came early, a worker died). The default of the Kaggle kernel.
--tta 0.33    at most ceil(0.33 x rows), most uncertain first; fewer is DEGRADED
--tta off     one view per row (also --no-tta, for old scripts)
The log ends with "TTA: N of M rows got both views (x%)".
"""

EPILOG = """\
examples:
  # Kaggle 2 x T4, Gemma2-9B in 4-bit, swapped views for the most uncertain rows that fit, 8h30m budget
  arena-predict --model /kaggle/input/gemma2-arena --test /kaggle/input/llm-classification-finetuning/test.csv \\
      --out /kaggle/working/submission.csv --devices cuda:0,cuda:1 --quantize 4bit --time-budget 8h30m --tta auto
  # ensemble of two exports, weighted arithmetic mean of their probabilities
  arena-predict --model runs/gemma2 --model runs/llama3 --weights 0.6,0.4 --test test.csv --out sub.csv
  # a LoRA adapter export whose base model lives elsewhere
  arena-predict --model runs/llama3-lora --base-model /kaggle/input/llama-3-8b --test test.csv --out sub.csv
  # a large file scored by 4 processes (e.g. a SLURM array: K=$SLURM_ARRAY_TASK_ID), then joined
  arena-predict --model runs/tiny --test extra.csv --out probs.$K.csv --shard $K/4
  arena-data merge probs.0.csv probs.1.csv probs.2.csv probs.3.csv --out probs.csv --test extra.csv
  # Gemma2-9B in fp16 split by layers over both T4s (no quantization loss)
  arena-predict --model /kaggle/input/gemma2-arena --test test.csv --out sub.csv --devices cuda:0,cuda:1 \\
      --parallel pipeline
  # two CPU worker processes (what the tests use)
  arena-predict --model runs/tiny --test test.csv --out sub.csv --devices cpu:2 --time-budget 10m

exit status: 0 full quality; 3 valid submission, something degraded (see the messages); 2 bad input/options;
1 unexpected error.
"""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _duration(text: str):
    from inference.budget import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _shard(text: str) -> tuple[int, int]:
    from data.shards import parse_shard

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tta(text: str):
    from inference.budget import parse_tta

    try:
        return parse_tta(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arena-predict", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="exported model directory (arena.json inside); repeat for an ensemble")
    p.add_argument("--weights", type=_floats, metavar="W1,W2",
                   help="ensemble weights, one per --model (normalised; default equal)")
    p.add_argument("--base-model", action="append", default=[], metavar="DIR",
                   help="base model for adapter exports: once for all models or once per --model "
                        "(default: arena.json base_model, else <model>/base)")
    p.add_argument("--test", required=True, metavar="CSV", help="Kaggle test.csv (id,prompt,response_a,response_b)")
    p.add_argument("--out", default="submission.csv", metavar="SUB", help="submission to write (default %(default)s)")
    p.add_argument("--devices", default="auto",
                   help="auto (all GPUs, else one CPU worker), cuda:0,cuda:1, cpu, or cpu:N worker processes")
    p.add_argument("--parallel", choices=("data", "pipeline"), default="data",
                   help="data: one model copy per device (default); pipeline: one unquantized model split by layers "
                        "over the devices (each holds about the same weight bytes; needs >= 2 devices, decoder "
                        "models, full-weight exports; --quantize is refused), e.g. Gemma2-9B fp16 over 2 x T4")
    p.add_argument("--micro-batches", type=int, default=4, metavar="M",
                   help="pipeline: each batch is cut into M micro-batches so that all stages work at once "
                        "(default %(default)s)")
    p.add_argument("--fallback-quantize", choices=("auto", "4bit", "8bit", "none", "off"), default="auto",
                   help="pipeline: if a stage dies, the remaining rows go to one data-parallel worker per device "
                        "with a copy quantized like this, when it fits (auto: 4bit on GPUs, unquantized on the "
                        "CPU); off, or no fit: they get the prior")
    p.add_argument("--time-budget", type=_duration, default=_duration("8h30m"), metavar="DURATION",
                   help="wall time from start, e.g. 8h30m, 90m, 600 (seconds), none (default 8h30m)")
    p.add_argument("--max-length", type=int, metavar="L",
                   help="tokens per rendered battle (default: the model's training max_length)")
    p.add_argument("--tta", type=_tta, nargs="?", const="on", default="on", metavar="on|auto|off|FRACTION",
                   help="who also gets the A/B-swapped view (averaged; ~2x the cost for all rows): on (every row, "
                        "default), auto (most uncertain first, as many as the budget fits), off, or a fraction "
                        "(at most that share, most uncertain first); see above")
    p.add_argument("--no-tta", dest="tta", action="store_const", const="off", help="same as --tta off")
    p.add_argument("--quantize", choices=("none", "8bit", "4bit"), default="none",
                   help="bitsandbytes weights: 8bit, or 4bit NF4 with fp16 compute (9B models on a 16 GB T4)")
    p.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="compute dtype (auto: fp16 on GPU, fp32 on CPU; a T4 has no bf16)")
    p.add_argument("--batch-tokens", type=int, metavar="N",
                   help="padded tokens per forward pass (default 8192 on GPU, 4096 on CPU); halved on out-of-memory")
    p.add_argument("--max-batch-rows", type=int, default=64, metavar="N", help="rows per batch at most (%(default)s)")
    p.add_argument("--checkpoint-every", type=_duration, default=120.0, metavar="DURATION",
                   help="rewrite the partial submission this often (default 120 s)")
    p.add_argument("--shard", type=_shard, metavar="K/N",
                   help="score only slice K of N (K from 0; contiguous, sizes differ by at most one row) of the test "
                        "rows, e.g. one per SLURM array task; --out then holds only those ids, plus OUT.shard.json "
                        "for `arena-data merge`")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def config_from_args(args):
    from inference.predict import PredictConfig

    return PredictConfig(
        models=tuple(args.model), test=args.test, out=args.out, weights=args.weights,
        base_models=tuple(args.base_model), devices=args.devices, time_budget=args.time_budget,
        max_length=args.max_length, tta=args.tta, quantize=args.quantize, dtype=args.dtype,
        batch_tokens=args.batch_tokens, max_batch_rows=args.max_batch_rows,
        checkpoint_every=args.checkpoint_every or 120.0, shard=args.shard, parallel=args.parallel,
        micro_batches=args.micro_batches,
        fallback_quantize=args.fallback_quantize,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from data.reading import DataError
    from inference.loading import ModelError
    from inference.predict import EXIT_FAILED, EXIT_USAGE, InputError, predict

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"arena-predict: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = predict(cfg, t0=_T0)
    except DataError as e:
        print(f"arena-predict: cannot read the test file:\n{e}", file=sys.stderr)
        return EXIT_USAGE
    except (ModelError, InputError, FileNotFoundError, ImportError) as e:  # a later ValueError is a bug: exit 1
        print(f"arena-predict: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("arena-predict: interrupted; the submission holds the rows scored so far", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - report and keep the (valid) partial file
        logging.getLogger("arena.predict").exception("unexpected error")
        print(f"arena-predict: unexpected error ({type(e).__name__}: {e}); {args.out} holds the rows scored so far",
              file=sys.stderr)
        return EXIT_FAILED
    for note in result.notes:
        print(f"arena-predict: note: {note}", file=sys.stderr)
    for m in result.messages:
        print(f"arena-predict: DEGRADED: {m}", file=sys.stderr)
    status = "degraded" if result.messages else "complete"
    print(f"arena-predict: {status}: {result.rows} rows written to {result.out} in {result.seconds:.1f}s",
          file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
