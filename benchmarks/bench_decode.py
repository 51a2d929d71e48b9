"""Benchmark: batched vs item-by-item greedy decoding, plain and with replay offsets.

A randomly initialised Qwen2.5-VL-shaped pair with the real vocabulary (152,064 rows) but a small
hidden size and depth, so it runs on a CPU. ``--batch`` items with images of different sizes and
prompts of different lengths (so every row is padded differently) are decoded greedily for exactly
``--tokens`` new tokens (``min_new_tokens`` masks the end tokens, which random weights would emit
at random). Both ways run side by side in one process, interleaved ``--repeats`` times after a short
warm-up; the medians give tokens/s and the ratio. Whether the two ways gave identical tokens (they
should: each row is decoded as it would be alone) is reported with the numbers.

    python benchmarks/bench_decode.py --threads 2                  # CPU defaults (10-60 min on 2 busy cores)
    python benchmarks/bench_decode.py --real-7b --device cuda      # Qwen2.5-VL-7B shapes, bf16, on a GPU
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
from lens.interventions import ActivationReplay, Baseline, Intervention  # noqa: E402
from lens.loading import ModelPair  # noqa: E402
from lens.testing import tiny_image_processor, tiny_qwen25vl, tiny_tokenizer  # noqa: E402

REAL_VOCAB = 152_064
QUESTIONS = (
    "How many red shapes are in the image?",
    "Count the shapes.",
    "How many red shapes are in the image? Answer with a number.",
    "Describe the image in one sentence, then give the final answer in a box.",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=64, help="text hidden size (default 64)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--vision-hidden", type=int, default=32)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vocab", type=int, default=REAL_VOCAB)
    p.add_argument("--batch", type=int, default=8, help="items decoded together (default 8)")
    p.add_argument("--tokens", type=int, default=256, help="new tokens per item (default 256)")
    p.add_argument(
        "--image-sides",
        default="112,168,224,140,196,84,252,126",
        help="image sides in px, cycled over the items (default: 8 different sizes)",
    )
    p.add_argument(
        "--replay-steps", type=int, default=2, help="replay steps that make the offsets (default 2)"
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--real-7b", action="store_true", help="Qwen2.5-VL-7B shapes (hidden 3584, 28 layers), bf16"
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.real_7b:
        args.hidden, args.heads, args.kv_heads, args.intermediate, args.layers = 3584, 28, 4, 18944, 28
        args.vision_hidden, args.vision_depth, args.dtype = 1280, 32, "bfloat16"
    if args.batch < 1 or args.tokens < 1 or args.repeats < 1:
        p.error("--batch, --tokens and --repeats must be >= 1")
    return args


def build(args: argparse.Namespace):
    torch.set_num_threads(args.threads)
    sides = [int(s) for s in args.image_sides.split(",") if s.strip()]
    tok = tiny_tokenizer()
    ip = tiny_image_processor(max_side=max(sides))
    kw = dict(
        hidden_size=args.hidden,
        num_layers=args.layers,
        vocab_size=args.vocab,
        intermediate_size=args.intermediate,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        vision_hidden=args.vision_hidden,
        vision_depth=args.vision_depth,
        dtype=getattr(torch, args.dtype),
        attn_implementation="sdpa",
    )
    # Built on the host, then moved (at 7B widths that needs ~50 GB of host memory per model, briefly).
    base = tiny_qwen25vl(tok, seed=0, **kw).to(args.device)
    rlvr = tiny_qwen25vl(tok, seed=1, **kw).to(args.device)
    pair = ModelPair.from_models(base, rlvr, tok, ip)
    inputs = []
    for i in range(args.batch):
        side = sides[i % len(sides)]
        rng = np.random.default_rng(i)
        img = Image.fromarray(rng.integers(0, 256, (side, side + 28 * (i % 2), 3), dtype=np.uint8))
        inputs.append(pair.encode(QUESTIONS[i % len(QUESTIONS)], [img]))
    return pair, inputs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    args = parse_args(argv)
    pair, inputs = build(args)
    decoding = decoding_for(pair, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    replay_layers = tuple(range(min(2, args.layers)))
    strategies: dict[str, Intervention] = {
        "baseline": Baseline(),
        "replay": ActivationReplay(
            layers=replay_layers, steps=args.replay_steps, topk=5, rule="quantile", quantile=0.3
        ),
    }
    states = {name: [s.prepare(pair, x).state for x in inputs] for name, s in strategies.items()}
    assert all(state.edits for state in states["replay"]), "every replay row needs non-zero offsets"
    lengths = [x.n_tokens for x in inputs]
    visual = [int(x.visual_positions.numel()) for x in inputs]
    print(
        f"pair: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype} on {args.device}, "
        f"{args.threads} thread(s); {args.batch} items of {min(lengths)}-{max(lengths)} prompt tokens "
        f"({min(visual)}-{max(visual)} visual); {args.tokens} new tokens each"
    )

    def batched(name: str, decoding=decoding):
        _sync(args.device)
        start = time.perf_counter()
        out = strategies[name].generate_batch(pair, states[name], decoding)
        _sync(args.device)
        return time.perf_counter() - start, [g.token_ids[0] for g in out]

    def one_by_one(name: str, decoding=decoding):
        _sync(args.device)
        start = time.perf_counter()
        out = [strategies[name].generate_batch(pair, [state], decoding)[0] for state in states[name]]
        _sync(args.device)
        return time.perf_counter() - start, [g.token_ids[0] for g in out]

    ways = {"batched": batched, "item-by-item": one_by_one}
    warm = decoding.replace(max_new_tokens=4, min_new_tokens=4)
    for name in strategies:  # warm-up (allocator, lazy init) on a short decode
        for fn in ways.values():
            fn(name, warm)
    times: dict[tuple[str, str], list[float]] = {(n, w): [] for n in strategies for w in ways}
    tokens: dict[tuple[str, str], list] = {}
    for repeat in range(args.repeats):  # interleaved so load changes hit every measurement alike
        for name in strategies:
            for way, fn in ways.items():
                seconds, out = fn(name)
                times[(name, way)].append(seconds)
                tokens.setdefault((name, way), out)
                print(
                    f"  repeat {repeat + 1}/{args.repeats} {name:8s} {way:12s} {seconds:8.2f} s", flush=True
                )

    produced = args.batch * args.tokens
    result: dict = {
        "config": vars(args),
        "prompt_tokens": lengths,
        "visual_tokens": visual,
        "decoding": decoding.to_dict(),
    }
    for name in strategies:
        same = tokens[(name, "batched")] == tokens[(name, "item-by-item")]
        assert all(len(t) == args.tokens for t in tokens[(name, "batched")])
        rate = {way: produced / statistics.median(times[(name, way)]) for way in ways}
        ratio = rate["batched"] / rate["item-by-item"]
        result[name] = {
            "batched_tokens_per_s": rate["batched"],
            "item_by_item_tokens_per_s": rate["item-by-item"],
            "speedup": ratio,
            "batched_s": times[(name, "batched")],
            "item_by_item_s": times[(name, "item-by-item")],
            "identical_tokens": same,
        }
        print(
            f"{name:8s}: batched {rate['batched']:8.1f} tok/s, item-by-item {rate['item-by-item']:8.1f} tok/s, "
            f"speed-up {ratio:.2f}x at batch {args.batch} (target >= 3x); identical tokens: {same}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
