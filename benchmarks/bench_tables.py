"""Post-processing of drift records at 7B shape: the in-memory pandas table + CSV (before) vs Parquet shards.

Usage:
    python benchmarks/bench_tables.py                              # new path at 200 and 1,000 items,
                                                                   # the old one at 50 and 200
    python benchmarks/bench_tables.py --items 200 --old-items 50   # quicker
    python benchmarks/bench_tables.py --json runs/bench_tables.json

Synthetic drift records of a 7B pair's shape (28 layers, 1,300 tokens of which 1,000 visual, so
36,400 rows per item) are written once per size in both formats, from the same seeded values:

* old: ``records.jsonl`` with base64 float32 arrays in every line (as ``drift_record`` packed them
  before); post-processing = read the lines, build one pandas table with object columns, bucket it
  and take Spearman ρ, write ``drift_table.csv``, ``drift_buckets.csv`` and ``drift_spearman.csv``
  (the frozen copy in ``tests/reference_drift.py``);
* new: ``records.jsonl`` lines pointing at Parquet shards in ``records/`` (:mod:`lens.tables`);
  post-processing = :func:`analyses.kl_drift.tabulate_drift` (streamed buckets and Spearman, the
  two small CSVs; no tidy CSV unless ``--csv``, measured as its own row).

Each post-processing runs in a fresh subprocess, so its peak RSS (``ru_maxrss``, imports included)
is its own; the sizes alternate old/new so both see the same machine load. The old path at 1,000
items needs ~13 GB: it is run at smaller sizes and extrapolated linearly (a + b·items), and the
table says so. The bucket tables of both paths are compared wherever both ran.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

LAYERS, TOKENS, VISUAL = 28, 1300, 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", default="200,1000", help="sizes for the new path (default 200,1000)")
    p.add_argument("--old-items", default="50,200", help="sizes for the old path (default 50,200)")
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--visual", type=int, default=VISUAL)
    p.add_argument("--buckets", type=int, default=5)
    p.add_argument("--workdir", default=None, help="where the records go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--child", choices=["old", "new", "new-csv"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- synthetic records --------------------------------------------------------------------------------


def roles(tokens: int, visual: int) -> list[str]:
    text = tokens - visual
    head, prompt = 5, max(0, text // 6)
    tail = 3
    response = max(0, text - head - prompt - tail)
    return (
        ["template"] * head
        + ["visual"] * visual
        + ["prompt"] * prompt
        + ["template"] * tail
        + ["response"] * response
    )


def sample_arrays(index: int, layers: int, tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded float32 [layers, tokens] arrays shaped like lens outputs (entropies in [0, ln 152064])."""
    rng = np.random.default_rng(index)
    entropy = np.clip(rng.gamma(2.0, 1.5, (layers, tokens)), 0, 11.93).astype(np.float32)
    rlvr = np.clip(entropy + rng.normal(0, 0.3, entropy.shape), 0, 11.93).astype(np.float32)
    kl = rng.exponential(1.0 / (1.0 + entropy)).astype(np.float32)
    return entropy, rlvr, kl


def write_old(run_dir: Path, items: int, args: argparse.Namespace) -> float:
    from reference_drift import legacy_record

    from lens.records import RecordWriter

    writer = RecordWriter(run_dir / "records.jsonl", resume=False)
    names = roles(args.tokens, args.visual)
    start = time.perf_counter()
    for i in range(items):
        writer.write(
            f"item{i:05d}",
            legacy_record(range(args.layers), names, *sample_arrays(i, args.layers, args.tokens)),
        )
    return time.perf_counter() - start


def write_new(run_dir: Path, items: int, args: argparse.Namespace) -> float:
    from analyses.kl_drift import DRIFT_SCHEMA, DriftRecord
    from lens.records import RecordWriter
    from lens.tables import ShardWriter

    writer = RecordWriter(run_dir / "records.jsonl", resume=False)
    names = tuple(roles(args.tokens, args.visual))
    start = time.perf_counter()
    with ShardWriter(writer, DRIFT_SCHEMA) as shards:
        for i in range(items):
            record = DriftRecord(
                f"item{i:05d}", tuple(range(args.layers)), names, *sample_arrays(i, args.layers, args.tokens)
            )
            shards.add(record.sample_id, record.to_arrow(), record.fields())
    return time.perf_counter() - start


# -- child side: one post-processing ---------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args: argparse.Namespace) -> None:
    # Both paths import the same modules first, so their baselines (torch included, through
    # lens.logit_lens, as in a real `lens drift` process) are the same and the peaks comparable.
    import reference_drift  # noqa: F401

    import analyses.kl_drift  # noqa: F401
    import lens.tables  # noqa: F401

    run_dir = Path(args.run_dir)
    out = run_dir / f"out-{args.child}"
    if args.child == "old":
        import reference_drift as ref

        from lens.records import atomic_write, iter_records

        baseline, cpu_before = _rss_mb(), _cpu_seconds()
        start = time.perf_counter()
        table = ref.drift_table(list(iter_records(run_dir / "records.jsonl")))
        buckets = ref.bucket_table(table, args.buckets)
        correlations = ref.correlation_table(table)
        for name, frame in {
            "drift_table": table,
            "drift_buckets": buckets,
            "drift_spearman": correlations,
        }.items():
            atomic_write(out / f"{name}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False))
    else:
        from analyses.kl_drift import DRIFT_SCHEMA, legacy_table, tabulate_drift
        from lens.records import iter_records
        from lens.tables import table_from_records

        baseline, cpu_before = _rss_mb(), _cpu_seconds()
        start = time.perf_counter()
        tidy = table_from_records(
            list(iter_records(run_dir / "records.jsonl")), run_dir, DRIFT_SCHEMA, legacy_table
        )
        tabulate_drift(tidy, args.buckets, out, csv=args.child == "new-csv")
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_before
    peak = usage.ru_maxrss / 1024
    print(
        json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak, "baseline_rss_mb": baseline})
    )


# -- parent side --------------------------------------------------------------------------------------


def run_child(kind: str, run_dir: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--run-dir",
        str(run_dir),
        "--buckets",
        str(args.buckets),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def folder_bytes(path: Path, exclude: tuple[str, ...] = ()) -> int:
    return sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file() and not any(x in f.parts for x in exclude)
    )


def same_buckets(a: Path, b: Path) -> bool:
    import pandas as pd

    return pd.read_csv(a).equals(pd.read_csv(b))


def extrapolate(points: dict[int, float], items: int) -> float:
    (n0, y0), (n1, y1) = sorted(points.items())[:1] + sorted(points.items())[-1:]
    slope = (y1 - y0) / (n1 - n0) if n1 != n0 else 0.0
    return y0 + slope * (items - n0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    new_sizes = [int(x) for x in args.items.split(",") if x]
    old_sizes = [int(x) for x in args.old_items.split(",") if x]
    rows_per_item = args.layers * args.tokens
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_tables_"))
    print(
        f"{args.layers} layers x {args.tokens} tokens ({args.visual} visual) = {rows_per_item:,} rows per item"
    )
    print(f"records in {work}; {os.cpu_count()} CPUs visible; load average {os.getloadavg()[0]:.1f}\n")

    results: dict[str, dict[int, dict]] = {"old": {}, "new": {}, "new-csv": {}}
    for items in sorted(set(new_sizes) | set(old_sizes)):
        if items in old_sizes:
            run_dir = work / f"old-{items}"
            write_seconds = write_old(run_dir, items, args)
            r = run_child("old", run_dir, args)
            r["write_seconds"] = write_seconds
            r["records_bytes"] = (run_dir / "records.jsonl").stat().st_size
            r["csv_bytes"] = (run_dir / "out-old" / "drift_table.csv").stat().st_size
            r["bytes"] = folder_bytes(run_dir)
            results["old"][items] = r
            print(
                f"old  {items:>5} items: {r['seconds']:6.1f} s, peak RSS {r['peak_rss_mb']:7.0f} MB (after imports {r['baseline_rss_mb']:.0f})"
            )
        if items in new_sizes:
            run_dir = work / f"new-{items}"
            write_seconds = write_new(run_dir, items, args)
            r = run_child("new", run_dir, args)
            r["write_seconds"] = write_seconds
            r["records_bytes"] = folder_bytes(run_dir, exclude=("out-new",))
            r["bytes"] = folder_bytes(run_dir)
            results["new"][items] = r
            print(
                f"new  {items:>5} items: {r['seconds']:6.1f} s, peak RSS {r['peak_rss_mb']:7.0f} MB (after imports {r['baseline_rss_mb']:.0f})"
            )
            if items in old_sizes:
                identical = same_buckets(
                    work / f"old-{items}" / "out-old" / "drift_buckets.csv",
                    run_dir / "out-new" / "drift_buckets.csv",
                )
                r["buckets_identical_to_old"] = identical
                print(f"      drift_buckets.csv identical to the old path's: {identical}")
            c = run_child("new-csv", run_dir, args)
            c["csv_bytes"] = (run_dir / "out-new-csv" / "drift_table.csv").stat().st_size
            results["new-csv"][items] = c
            print(f"new+csv {items:>2} items: {c['seconds']:6.1f} s, peak RSS {c['peak_rss_mb']:7.0f} MB")

    # Side by side.
    mb = 2**20
    print(
        "\n| items | path | post-processing s (CPU s) | peak RSS MB | on disk MB (records + tables) | tidy table MB |"
    )
    print("|---|---|---|---|---|---|")
    sizes = sorted(set(new_sizes) | set(old_sizes))
    extrapolated = {}
    for items in sizes:
        old = results["old"].get(items)
        if old is None and len(results["old"]) >= 2:
            old = {
                key: extrapolate({n: v[key] for n, v in results["old"].items()}, items)
                for key in ("seconds", "cpu_seconds", "peak_rss_mb", "bytes", "csv_bytes", "records_bytes")
            }
            extrapolated[items] = old
            label = "old (extrapolated)"
        else:
            label = "old"
        if old is not None:
            print(
                f"| {items} | {label} | {old['seconds']:.1f} ({old['cpu_seconds']:.1f}) | {old['peak_rss_mb']:.0f} | "
                f"{old['bytes'] / mb:.0f} | {old['csv_bytes'] / mb:.0f} (drift_table.csv) |"
            )
        new = results["new"].get(items)
        if new is not None:
            print(
                f"| {items} | new | {new['seconds']:.1f} ({new['cpu_seconds']:.1f}) | {new['peak_rss_mb']:.0f} | "
                f"{new['bytes'] / mb:.0f} | "
                f"{new['records_bytes'] / mb:.0f} (records.jsonl + records/*.parquet) |"
            )
            csv = results["new-csv"][items]
            print(
                f"| {items} | new + --csv | {csv['seconds']:.1f} ({csv['cpu_seconds']:.1f}) | {csv['peak_rss_mb']:.0f} | "
                f"{(new['bytes'] + csv['csv_bytes']) / mb:.0f} | {csv['csv_bytes'] / mb:.0f} (+ drift_table.csv) |"
            )
        if old is not None and new is not None:
            print(
                f"| {items} | new / old | {new['seconds'] / old['seconds']:.2f}x | "
                f"{new['peak_rss_mb'] / old['peak_rss_mb']:.2f}x | {new['bytes'] / old['bytes']:.2f}x | "
                f"{new['records_bytes'] / old['csv_bytes']:.1%} of the old CSV |"
            )
    if len(results["new"]) >= 2:
        lo, hi = min(results["new"]), max(results["new"])
        growth = results["new"][hi]["peak_rss_mb"] - results["new"][lo]["peak_rss_mb"]
        print(f"\nnew path: peak RSS grows by {growth:.0f} MB from {lo} to {hi} items")
    print(
        "record writing during a run (not post-processing), s per item: "
        + ", ".join(
            f"{kind} {n}: {r['write_seconds'] / n * 1000:.1f} ms"
            for kind in ("old", "new")
            for n, r in results[kind].items()
        )
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": vars(args), "results": results, "old_extrapolated": extrapolated}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
