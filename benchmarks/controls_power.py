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
import math
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses.kl_drift import DriftConfig, run_drift  # noqa: E402
from lens import organism  # noqa: E402
from lens.controls import plant  # noqa: E402


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def detects(buckets: pd.DataFrame, layer: int, target: int) -> tuple[bool, bool]:
    """Whether the target bucket's mean visual KL exceeds every other bucket's: at ``layer``, pooled."""
    out = []
    for rows in (buckets.layer == layer, buckets.scope == "pooled"):
        kl = buckets[rows & (buckets.token_group == "visual")].set_index("bucket").mean_kl
        out.append(bool(kl[target] > kl.drop(target).max()))
    return out[0], out[1]


def power_curve(
    sizes: list[float], where: str, on: str, layer: int, fraction: float, replicates: int, n_items: int
) -> pd.DataFrame:
    pair = organism.load_pair()
    pool = organism.heldout(replicates * n_items)
    target = 5 if where == "high" else 1
    rows = []
    for size in sizes:
        hits_layer = hits_pooled = 0
        for r in range(replicates):
            items = pool[r * n_items : (r + 1) * n_items]
            with plant(pair, where=where, size=size, layer=layer, fraction=fraction, seed=r, on=on) as twin:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    buckets = run_drift(twin, items, config=DriftConfig()).buckets
            at_layer, pooled = detects(buckets, layer, target)
            hits_layer += at_layer
            hits_pooled += pooled
        for scope, hits in (("layer", hits_layer), ("pooled", hits_pooled)):
            low, high = wilson(hits, replicates)
            rows.append(
                dict(
                    where=where, on=on, layer=layer, fraction=fraction, size=size, scope=scope,
                    target_bucket=target, replicates=replicates, items=n_items,
                    power=hits / replicates, ci_low=low, ci_high=high,
                )
            )  # fmt: skip
        print(rows[-2], rows[-1], sep="\n", flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--where", default="low", choices=("low", "high", "random", "text"))
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
