"""``lens replay``: Activation Replay over a τ × α grid (the paper's Table 5), with loss curves.

With ``--mask quantile`` the grid's first axis is the mask quantile (``--quantiles``) instead of τ.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lens.commands.common import add_pair_arguments
from lens.commands.intervene import add_run_arguments, check_before_loading, parse_floats, run_config
from lens.commands.runs import (
    run_comparisons,
    run_job,
    write_comparison_tables,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="Activation Replay with a tau x alpha ablation grid",
        description="Run Activation Replay (the released algorithm by default) next to the plain RLVR model; "
        "with --grid, over the paper's tau x alpha grid. Writes ablation.csv, the heatmap and loss curves.",
    )
    add_pair_arguments(parser, several=True)
    add_run_arguments(parser, "runs/replay")
    parser.add_argument(
        "--grid",
        action="store_true",
        help="sweep --taus (or --quantiles with --mask quantile) x --alphas instead of one setting",
    )
    parser.add_argument("--taus", default="0.2,0.4", help="grid taus (default 0.2,0.4)")
    parser.add_argument("--alphas", default="10,20,40", help="grid alphas (default 10,20,40)")
    parser.add_argument(
        "--quantiles", default="0.2,0.3", help="grid mask quantiles with --mask quantile (default 0.2,0.3)"
    )
    parser.add_argument("--high", action="store_true", help="invert the mask (high-entropy replay control)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from analyses.replay import ReplayGrid, run_replay_grid

    config = run_config(args, ("rlvr", "replay"))
    if args.grid:
        grid = ReplayGrid(
            parse_floats(args.taus, "--taus"),
            parse_floats(args.alphas, "--alphas"),
            parse_floats(args.quantiles, "--quantiles"),
        )
    else:
        grid = ReplayGrid((args.tau,), (args.alpha,), (args.quantile,))
    samples, models = check_before_loading(args, config, ("rlvr", "replay-high" if args.high else "replay"))

    def run_grid(pair, out, resume, shard=None):
        title = f"{pair.names[0]} → {pair.names[1]}"
        select = "high" if args.high else "low"
        return run_replay_grid(
            pair, samples, out, grid, config, select, resume=resume, progress=True, title=title, shard=shard
        )

    if models is None:
        names: list[tuple[str, str]] = []

        def work(pair, resume, shard):
            names.append(tuple(pair.names))
            return run_grid(pair, args.out, resume, shard)

        result = run_job(args, work, not args.no_resume)
        if result is None:
            return 0
        results = {names[0]: result}
    else:
        results = run_comparisons(args, models, run_grid)
        write_comparison_tables(args.out, {"ablation": {c: r.ablation for c, r in results.items()}})
    axis = "quantile" if config.mask_rule == "quantile" else "tau"
    columns = [axis, "alpha", "greedy_pass@1", "ci_low", "ci_high", "delta_vs_rlvr", "delta_ci_low",
               "delta_ci_high", "mean_first_loss", "mean_final_loss"]  # fmt: skip
    rule = "τ·max mask" if axis == "tau" else "quantile mask"
    mask = rule if args.grid else config.mask.describe()
    for (reference, other), result in results.items():
        title = f"{reference} → {other}"
        print(f"\nActivation Replay ({mask}), {len(samples)} items, {title}; 95% bootstrap CIs:")
        print(result.ablation[columns].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    files = "ablation.csv, summary.csv, ablation_heatmap.png, replay_loss.png, records.jsonl"
    if models is None:
        print(f"\nwrote {Path(args.out)}/{files}")
    else:
        print(
            f"\nwrote {Path(args.out)}/ablation.csv (a comparison column), and per twin {Path(args.out)}/<twin>/: {files}"
        )
    return 0
