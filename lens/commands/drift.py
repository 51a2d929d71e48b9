"""``lens drift``: KL(P_base ‖ P_rlvr) by base-entropy bucket over a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from lens.commands.common import (
    add_pair_arguments,
    add_video_arguments,
    check_layers,
    check_resume,
    check_run_options,
    check_samples,
    inspect_pair,
    parse_layers,
    read_dataset,
    video_options,
)
from lens.commands.runs import (
    load_set_from_args,
    model_set_options,
    run_job,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "drift",
        help="logit-lens KL drift by base entropy",
        description="Logit lens of both models; KL(P_base || P_rlvr) bucketed by base-entropy quantile.",
    )
    add_pair_arguments(parser, several=True)
    parser.add_argument("--data", default=None, help="JSONL dataset (default: the organism's held-out set)")
    parser.add_argument("--items", type=int, default=200, help="held-out items when --data is not given")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples (N >= 1)")
    parser.add_argument("--out", default="runs/drift", help="output folder (default: runs/drift)")
    parser.add_argument("--buckets", type=int, default=5, help="base-entropy quantile buckets (default 5)")
    parser.add_argument("--layers", default=None, help="layers, e.g. 0-15 (default: all)")
    parser.add_argument("--no-resume", action="store_true", help="discard records already in --out")
    add_video_arguments(parser)
    parser.add_argument(
        "--csv",
        action="store_true",
        help="also write the tidy table as drift_table.csv (large; `lens export` can do it later)",
    )
    parser.set_defaults(handler=run)


def load_samples(args: argparse.Namespace) -> list:
    """The dataset (``--data``, or ``--items`` organism items), cut to ``--limit``, images opened once.

    Raises:
        ConfigError: ``--items`` or ``--limit`` below 1.
        DatasetError / InputError: A malformed dataset or an unreadable image.
    """
    from lens.commands.common import check_at_least
    from lens.datasets import check_images

    check_at_least(args.items, "--items")
    check_at_least(args.limit, "--limit")
    if args.data is not None:
        samples = read_dataset(args.data)
    else:
        from lens import organism

        variant = args.base if args.base in organism.VARIANTS else "organism"
        samples = organism.heldout_of(variant, n=args.items)
    if args.limit is not None:
        samples = samples[: args.limit]
    # Before loading the pair: a corrupt image fails fast and leaves nothing behind.
    check_images(samples, video_options(args))
    return samples


def run(args: argparse.Namespace) -> int:
    from analyses.kl_drift import DriftConfig, run_drift, summary_table

    check_run_options(args)
    config = DriftConfig(n_buckets=args.buckets, layers=parse_layers(args.layers))
    models = model_set_options(args)
    samples = load_samples(args)
    if models is not None:
        return run_set(args, config, models, samples)
    spec = inspect_pair(args)
    check_layers(config.layers, spec.n_layers)
    check_samples(samples, spec, args.data)
    check_resume(Path(args.out) / "records.jsonl", spec, args)
    titles = []

    def work(pair, resume, shard):
        titles.append(f"{pair.names[0]} → {pair.names[1]}")
        return run_drift(
            pair, samples, args.out, config, resume, progress=True, title=titles[0], csv=args.csv, shard=shard
        )

    result = run_job(args, work, resume=not args.no_resume)
    if result is None:
        return 0
    title = titles[0]
    out = Path(args.out)
    print(f"\nKL(P_base || P_rlvr) by base-entropy bucket (1 = lowest), {len(samples)} samples, {title}:")
    print(summary_table(result).to_string(float_format=lambda x: f"{x:.4f}"))
    rho = result.correlations[result.correlations["scope"] == "pooled"]
    for _, row in rho.iterrows():
        print(f"Spearman rho(base entropy, KL), {row['token_group']} tokens: {row['spearman_rho']:+.3f}")
    tables = "drift_buckets.csv, drift_spearman.csv" + (", drift_table.csv" if args.csv else "")
    print(
        f"\nwrote {out / 'kl_by_entropy.png'} (+.pdf), {tables}, records.jsonl + records/ (tidy table, Parquet)"
    )
    return 0


def run_set(args: argparse.Namespace, config, models, samples: list) -> int:
    """Drift of several twins against one base, or of consecutive stages (``--models``)."""
    from analyses.set_drift import run_set_drift

    check_layers(config.layers, models.spec.n_layers)
    check_samples(samples, models.spec, args.data)
    title = " / ".join(models.sources)

    def work(model_set, resume, shard):
        return run_set_drift(
            model_set, samples, args.out, config, resume, progress=True, title=title, shard=shard
        )

    result = run_job(
        args, work, not args.no_resume, load=lambda device: load_set_from_args(args, models, device)
    )
    if result is None:
        return 0
    print(f"\nKL(P_reference || P_twin) by reference-entropy bucket (1 = lowest), {len(samples)} samples:")
    pooled = result.buckets[result.buckets["scope"] == "pooled"]
    wide = pooled.pivot_table(
        index=["comparison", "bucket"], columns="token_group", values="mean_kl", sort=False
    )
    wide.columns = [f"mean KL ({c})" for c in wide.columns]
    print(wide.to_string(float_format=lambda x: f"{x:.4f}"))
    rho = result.correlations[result.correlations["scope"] == "pooled"]
    for _, row in rho.iterrows():
        print(f"Spearman rho, {row['comparison']}, {row['token_group']} tokens: {row['spearman_rho']:+.3f}")
    print(
        f"\nwrote {Path(args.out) / 'kl_by_entropy.png'} (+.pdf), drift_buckets.csv, drift_spearman.csv "
        "(a comparison column), records.jsonl + records/"
    )
    return 0
