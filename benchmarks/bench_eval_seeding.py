"""Benchmark: per-item sampling (``lens eval`` today) against the former batched scheme.

``lens eval`` generates each (model, item) alone, its sampler seeded from (seed, model, item), so a
resumed evaluation equals an uninterrupted one byte for byte. Before, the sampler was seeded once per
model and items were batched (250 items per greedy call, 512 sequences per sampled call), which is
faster but makes every item's samples depend on which items ran before it in the same batch.

Both schemes run on the organism's ``base`` model over the same held-out items, alternating, one
thread; the script prints the median wall time of each and their ratio.

    python benchmarks/bench_eval_seeding.py --items 500 --n 16 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses.evaluate import EvalConfig, score_item  # noqa: E402
from lens import organism  # noqa: E402
from lens.organism.model import Encoder  # noqa: E402
from lens.organism.train import rollout  # noqa: E402


def batched(model, encoder, samples, n: int) -> None:
    """The former scheme: one seed per model, items batched."""
    torch.manual_seed(0)
    for i in range(0, len(samples), 250):
        part = samples[i : i + 250]
        rollout(model, encoder, part, n=1, do_sample=False, batch_size=250)
        rollout(model, encoder, part, n=n, do_sample=True, batch_size=512)


def per_item(model, encoder, samples, n: int) -> None:
    cfg = EvalConfig(ks=(1,), n=n)
    for sample in samples:
        score_item(model, encoder, sample, organism.verify, cfg, "base")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, _ = organism.load_model("base")
    encoder = Encoder(tok)
    samples = organism.heldout(args.items)
    times: dict[str, list[float]] = {"batched": [], "per item": []}
    for _ in range(args.repeats):
        for label, run in (("batched", batched), ("per item", per_item)):
            start = time.perf_counter()
            run(model, encoder, samples, args.n)
            times[label].append(time.perf_counter() - start)
    old, new = (statistics.median(times[k]) for k in ("batched", "per item"))
    print(f"{args.items} items, n={args.n}, one model, {args.threads} thread(s), median of {args.repeats}:")
    print(f"  batched  {old:7.2f} s   per item {new:7.2f} s   ratio {new / old:.2f}x")
    print(f"  runs: {times}")


if __name__ == "__main__":
    main()
