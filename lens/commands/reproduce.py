"""``lens reproduce``: every analysis on a pair, collected into one report."""

from __future__ import annotations

import argparse

from lens.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="run drift, pass@k, interventions, replay and perturbation; write one report",
        description="Run every analysis on the built-in organism and write report.md with every figure, "
        "table, setting, seed and version. Rerun with the same --out to resume.",
    )
    parser.add_argument("--pair", default="organism", help="pair to reproduce (known: organism)")
    parser.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every stage's item count (e.g. 0.1 for a smoke run)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and bootstraps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from lens.commands.common import check_run_options

    if args.pair != "organism":
        raise ConfigError(f"unknown pair {args.pair!r}; known pairs: organism")
    if not args.scale > 0:
        raise ConfigError(f"--scale must be > 0, got {args.scale}")
    check_run_options(args)
    import torch

    from analyses.reproduce import ReproduceConfig, run_reproduce
    from lens.outdir import OutputFolder

    torch.set_num_threads(args.threads)
    config = ReproduceConfig(seed=args.seed)
    if args.scale != 1.0:
        config = config.scaled(args.scale)
    with OutputFolder(args.out):
        report = run_reproduce(args.out, config)
    print(f"wrote {report}")
    return 0
