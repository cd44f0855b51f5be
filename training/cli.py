"""`arena-train` / `python -m training`: parse the run config (YAML + key=value overrides) and train, or print the
per-GPU memory plan (--plan) without starting anything.

    arena-train --config configs/tiny/llama_cpu.yaml train.max_steps=30
    arena-train --config configs/gemma2/9b_full.yaml --plan --gpus 8 --nodes 1
    deepspeed --num_gpus 8 --module training --config configs/gemma2/9b_full.yaml
    torchrun --nproc_per_node 8 -m training --config configs/llama3/8b_full.yaml
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="arena-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, parsed as YAML values")
    p.add_argument("--plan", action="store_true", help="print the per-GPU memory plan and exit")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node for --plan (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes for --plan (default 1)")
    # the `deepspeed` launcher appends --local_rank=N; the env var LOCAL_RANK carries the same value
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_intermixed_args(argv)  # overrides may come before, between or after the options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, check_files=not args.plan)
    except ConfigError as e:
        print(f"arena-train: config error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        from .plan import plan_for_config

        plan = plan_for_config(cfg, gpus_per_node=args.gpus, nodes=args.nodes)
        print(plan.render())
        return 0 if plan.fits else 1
    from data.reading import DataError

    from .train import run

    try:
        run(cfg)
    except DataError as e:  # bad competition file: every problem names file, line, id and column
        print(f"arena-train: cannot use the data:\n{e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConfigError) as e:
        print(f"arena-train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
