"""``lens export RUN_DIR``: the tidy drift table of a run folder as one Parquet or CSV file."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("parquet", "csv")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a drift run's tidy table as one Parquet or CSV file",
        description=(
            "Stream the tidy per-(sample, layer, position) table of a `lens drift` output folder "
            "(its records.jsonl and Parquet shards in records/) into one file, one sample at a time."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `lens drift`")
    parser.add_argument("--format", default="parquet", help="parquet (default) or csv")
    parser.add_argument("--out", default=None, help="output file (default: RUN_DIR/drift_table.FORMAT)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from analyses.kl_drift import open_drift_table
    from lens.errors import ConfigError, DatasetError

    if args.format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise DatasetError(f"run folder not found: {run_dir}")
    out = Path(args.out) if args.out is not None else run_dir / f"drift_table.{args.format}"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the file to write")
    table = open_drift_table(run_dir)
    written = table.write_csv(out) if args.format == "csv" else table.write_parquet(out)
    print(f"wrote {written} ({len(table)} samples)")
    return 0
