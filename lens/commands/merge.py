"""``lens merge OUT``: combine the finished shards of a data-parallel run into its record log."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge the shards of a --shard / torchrun run into OUT",
        description=(
            "Merge OUT/shards/*/ (written by `--shard i/N` jobs or torchrun ranks) into OUT/records.jsonl, "
            "after checking that every shard ran the same settings, models and data; then remove the "
            "shard folders. A shard still running is refused. Rerun the command without --shard "
            "to draw the tables: every merged record is reused, nothing is recomputed."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="the run's --out folder")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from lens.distributed import merge
    from lens.errors import DatasetError

    out = Path(args.out)
    if not out.is_dir():
        raise DatasetError(
            f"{out} is a file, not a run folder" if out.exists() else f"run folder not found: {out}"
        )
    report = merge(out)
    print(
        f"merged {len(report.shards)} shard(s) into {out / 'records.jsonl'}: {report.merged} records from "
        f"the shards, {report.kept} kept from earlier runs"
    )
    if report.missing:
        print(
            f"{len(report.missing)} of {len(report.keys)} records are still missing (first: "
            f"{report.missing[0]!r}); rerun the unfinished shard(s) with the same command, or run it "
            "without --shard to compute them here"
        )
    elif report.command:
        print(f"every record is in; draw the tables (nothing is recomputed):\n  {shlex.join(report.command)}")
    return 0
