"""Benchmark: PTI's prefill overhead, as a ratio to a plain prefill measured side by side.

A randomly initialised Qwen2.5-VL-shaped pair (small width and depth, so it runs on a CPU) decodes
one image prompt for exactly one new token, i.e. the prefill and nothing else (the vision tower
included, as in any prefill), with:

* ``plain``: the RLVR model as is (:class:`~lens.interventions.Baseline`);
* ``pti-released``: PTI as released (prefix prefill, cache steered, last prompt token fed against
  the steered cache: one more single-token forward);
* ``pti-inline``: PTI steering the keys/values as the one prefill writes them.

The three are interleaved ``--repeats`` times after a warm-up (the cores are shared and noisy), and
the ratios of the medians are reported. Directions are random ones of the right shape (the
overhead does not depend on their values).

    python benchmarks/bench_pti.py --threads 1                       # CPU, small size (~1 min)
    python benchmarks/bench_pti.py --hidden 3584 --layers 4 --heads 28 --kv-heads 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lens.decoding import decoding_for  # noqa: E402
from lens.fingerprint import pair_fingerprint  # noqa: E402
from lens.interventions import Baseline  # noqa: E402
from lens.interventions.pti import PTI  # noqa: E402
from lens.interventions.pti_directions import KINDS, PTIDirections  # noqa: E402
from lens.loading import ModelPair  # noqa: E402
from lens.testing import tiny_image_processor, tiny_qwen25vl, tiny_tokenizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="text hidden size (default 256)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--image", type=int, default=336, help="image side in pixels (default 336: 144 tokens)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved timed rounds (default 15)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok, ip = tiny_tokenizer(), tiny_image_processor()
    models = [
        tiny_qwen25vl(
            tok, seed=s, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
            num_kv_heads=args.kv_heads, attn_implementation="sdpa",
        ).to(args.device)
        for s in (0, 1)
    ]  # fmt: skip
    pair = ModelPair.from_models(*models, tok, ip)
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (args.image, args.image, 3), dtype=np.uint8)
    )
    inputs = pair.encode("How many red shapes are in the image? Answer with a number.", [image])
    head_dim = args.hidden // args.heads
    gen = torch.Generator().manual_seed(0)
    directions = PTIDirections(
        tensors={
            f"{s}.{p}": torch.randn(args.layers, args.kv_heads, head_dim, generator=gen) for s, p in KINDS
        },
        checkpoints=pair_fingerprint(pair)["checkpoints"],
        names=pair.names,
    )
    decoding = decoding_for(pair).replace(max_new_tokens=1)
    ways = {
        "plain": Baseline(),
        "pti-released": PTI(directions, mode="released"),
        "pti-inline": PTI(directions, mode="inline"),
    }
    states = {name: way.prepare(pair, inputs).state for name, way in ways.items()}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(args.warmup + args.repeats):
        order = list(ways) if round_ % 2 == 0 else list(reversed(ways))  # alternate who goes first
        for name in order:
            start = time.perf_counter()
            ways[name].generate_batch(pair, [states[name]], decoding)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "prompt_tokens": inputs.n_tokens,
        "image_tokens": int(inputs.visual_positions.numel()),
        "shape": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
        },
        "threads": torch.get_num_threads(),
        "device": args.device,
        "repeats": args.repeats,
        "median_s": medians,
        "ratio_released": medians["pti-released"] / medians["plain"],
        "ratio_inline": medians["pti-inline"] / medians["plain"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
