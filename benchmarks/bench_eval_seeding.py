"""Benchmark: per-item sampling (``lens eval`` today) against the former batched scheme.

``lens eval`` generates each (model, item) alone, its sampler seeded from (seed, model, item), so a
resumed evaluation equals an uninterrupted one byte for byte. Before, the sampler was seeded once per
model and items were batched (250 items per greedy call, 512 sequences per sampled call), which is
faster but makes every item's samples depend on which items ran before it in the same batch.

Both schemes run on the organism's ``base`` model over the same held-out items, alternating, at
each thread count given; the script prints the median wall and CPU time of each. On a shared, busy
machine CPU time is the steadier measure (wall time includes waiting for a core). Per-item batches
are tiny (1 and ``n`` sequences): intra-op threads do not help them, which is why ``lens eval``
defaults to one thread.

    python benchmarks/bench_eval_seeding.py --items 150 --n 16 --repeats 5 --threads 1,2
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
    parser.add_argument("--threads", default="1", help="torch threads, comma-separated to compare (e.g. 1,2)")
    args = parser.parse_args(argv)
    model, tok, _ = organism.load_model("base")
    encoder = Encoder(tok)
    samples = organism.heldout(args.items)
    schemes = [(t, label, run) for t in map(int, args.threads.split(",")) for label, run in
               (("batched", batched), ("per item", per_item))]  # fmt: skip
    wall: dict[str, list[float]] = {f"{label}, {t} thread(s)": [] for t, label, _ in schemes}
    cpu: dict[str, list[float]] = {key: [] for key in wall}
    for _ in range(args.repeats):
        for threads, label, run in schemes:
            torch.set_num_threads(threads)
            start, start_cpu = time.perf_counter(), time.process_time()
            run(model, encoder, samples, args.n)
            wall[f"{label}, {threads} thread(s)"].append(time.perf_counter() - start)
            cpu[f"{label}, {threads} thread(s)"].append(time.process_time() - start_cpu)
    print(f"{args.items} items, n={args.n}, one model, median of {args.repeats} (ratio: to the first row):")
    first = next(iter(wall))
    for key in wall:
        w, c = statistics.median(wall[key]), statistics.median(cpu[key])
        ratio = w / statistics.median(wall[first])
        print(f"  {key:24s} wall {w:7.2f} s ({ratio:5.2f}x)   CPU {c:7.2f} s")
    print(f"  wall runs: {wall}\n  CPU runs:  {cpu}")


if __name__ == "__main__":
    main()
