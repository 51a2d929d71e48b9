"""Detection power of the drift analysis on planted twins, against the plant's size.

For each size and each replicate r (its own plant direction, seed r, and its own disjoint set of
held-out organism items), plant an offset in the organism (``--on base``: the base plus the edit,
no other drift; ``--on rlvr``: the RLVR twin plus the edit, over its real drift), run the drift
analysis, and record whether the target bucket's mean visual KL exceeds every other bucket's
(target: bucket 1 for ``low``/``random`` plants, the top bucket for ``high``), at the planted layer
and pooled over all layers. Power = the fraction of replicates that detect, with a Wilson 95% CI.

    python benchmarks/controls_power.py --where low --on base --sizes 0,0.25,0.5,1,2 --replicates 10 --items 12
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses.controls import detection_power, drift_detection  # noqa: E402
from lens import organism  # noqa: E402


def power_curve(
    sizes: list[float], where: str, on: str, layer: int, fraction: float, replicates: int, n_items: int
) -> pd.DataFrame:
    """Power of "the planted bucket wins" per size and scope, from :mod:`analyses.controls`."""
    pair = organism.load_pair()
    detection = drift_detection(
        pair, organism.heldout(replicates * n_items), sizes, wheres=(where,), replicates=replicates,
        n_items=n_items, layer=layer, fraction=fraction, on=on,
    )  # fmt: skip
    power = detection_power(detection).query("criterion == 'planted bucket'")
    power = power.assign(on=on, layer=layer, fraction=fraction).rename(columns={"target": "target_bucket"})
    power = power.sort_values(["size", "scope"], kind="stable")
    columns = ["where", "on", "layer", "fraction", "size", "scope", "target_bucket", "replicates", "items"]
    return power[[*columns, "power", "ci_low", "ci_high"]].reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--where", default="low", choices=("low", "high", "random"))
    parser.add_argument("--on", default="base", choices=("base", "rlvr"))
    parser.add_argument("--sizes", default="0,0.25,0.5,1,2")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--replicates", type=int, default=10)
    parser.add_argument("--items", type=int, default=12)
    parser.add_argument("--out", default="runs/controls_power")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    sizes = [float(s) for s in args.sizes.split(",")]
    table = power_curve(sizes, args.where, args.on, args.layer, args.fraction, args.replicates, args.items)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"power_{args.where}_{args.on}.csv"
    table.to_csv(path, index=False)
    print(table.to_string(index=False))
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
