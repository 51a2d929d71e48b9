"""Loading a big VLMEvalKit TSV: ``lens.datasets.load_tsv`` vs pandas + base64, side by side.

Usage:
    python benchmarks/bench_datasets.py                    # ~250 MB TSV, 3,000 rows, 3 repeats
    python benchmarks/bench_datasets.py --rows 12000       # ~1 GB, MathVerse-sized

The TSV is written the way VLMEvalKit writes its files (``DataFrame.to_csv(sep="\\t")``): 224x224 PNGs
in base64 (half incompressible noise, half blocky), every tenth row reusing the previous row's image
by index, two option columns. Each measurement runs in a fresh subprocess (so peak RSS is its own),
alternating methods so both see the same machine load:

* pandas: ``pd.read_csv(sep="\\t")`` plus ``base64.b64decode`` of every image cell: the least any
  reader must do before it can hand image bytes to a processor (VLMEvalKit then decodes each image
  with PIL and writes it to disk);
* load_tsv: the same, plus a PIL header/structure check of every image, the index references
  resolved, and one ``Sample`` per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import base64, json, sys, time
import pandas as pd
from lens.datasets import load_tsv  # imports torch via lens: kept out of the timing
path, method = sys.argv[1], sys.argv[2]
wall, cpu = time.perf_counter(), time.process_time()
if method == "pandas":
    frame = pd.read_csv(path, sep="\t")
    images = [base64.b64decode(c) for c in frame["image"] if isinstance(c, str) and len(c) > 64]
    n = len(frame)
else:
    n = len(load_tsv(path))
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
# VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's peak over exec).
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": wall, "cpu_seconds": cpu, "rows": n, "peak_rss_mb": peak / 1024}))
"""


def write_tsv(path: Path, rows: int) -> None:
    import base64
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    records = []
    for i in range(rows):
        pixels = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
        if i % 2:
            pixels = np.repeat(np.repeat(pixels[::8, ::8], 8, 0), 8, 1)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        image = str(i - 1) if i % 10 == 0 and i else base64.b64encode(buffer.getvalue()).decode()
        records.append(
            {
                "index": i,
                "image": image,
                "question": f"What is shown?\nItem {i}.",
                "A": "x",
                "B": "y",
                "answer": "A",
            }
        )
    pd.DataFrame(records).to_csv(path, sep="\t", index=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.tsv"
        write_tsv(path, args.rows)
        size_mb = path.stat().st_size / 2**20
        runs: dict[str, list[dict]] = {"pandas": [], "load_tsv": []}
        for _ in range(args.repeats):
            for method in runs:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), method], capture_output=True, text=True, cwd=root
                )
                if out.returncode:
                    raise SystemExit(out.stderr)
                runs[method].append(json.loads(out.stdout))
    print(f"TSV: {args.rows} rows, {size_mb:.0f} MB; median of {args.repeats} fresh processes")
    wall = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    cpu = {m: statistics.median(r["cpu_seconds"] for r in rs) for m, rs in runs.items()}
    for method, rs in runs.items():
        peak = statistics.median(r["peak_rss_mb"] for r in rs)
        print(
            f"  {method:9s} wall {wall[method]:6.2f} s  cpu {cpu[method]:6.2f} s  "
            f"{size_mb / cpu[method]:6.1f} MB per cpu-s  peak RSS {peak:6.0f} MB"
        )
    print(
        f"  load_tsv / pandas: wall {wall['load_tsv'] / wall['pandas']:.2f}, cpu {cpu['load_tsv'] / cpu['pandas']:.2f}"
    )


if __name__ == "__main__":
    main()
