"""``lens pti directions``: compute PTI's steering directions for a pair and save them."""

from __future__ import annotations

import argparse

from lens.commands.common import (
    add_pair_arguments,
    check_at_least,
    check_device,
    inspect_pair,
    load_pair_from_args,
)
from lens.errors import ConfigError

CALIBRATIONS = ("organism",)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pti",
        help="PTI (prefill-time KV-cache steering): compute its directions",
        description="PTI tools. `lens pti directions` reads the KV cache of calibration contrasts "
        "(object-only vs background-only images; prompts with vs without the object words) and saves "
        "per-layer, per-head key/value directions for `lens intervene --strategies pti`.",
    )
    sub = parser.add_subparsers(dest="pti_command", metavar="ACTION")
    sub.required = True
    directions = sub.add_parser("directions", help="compute and save the steering directions of a pair")
    add_pair_arguments(directions)
    directions.add_argument("--out", required=True, help="output file, FILE.safetensors (+ FILE.json)")
    directions.add_argument(
        "--calibration",
        default="organism",
        choices=CALIBRATIONS,
        help="calibration contrasts: organism (drawn shapes; exact object masks) (default)",
    )
    directions.add_argument("--n", type=int, default=32, help="calibration items (default 32; PTI uses 100)")
    directions.add_argument(
        "--seed", type=int, default=None, help="calibration seed (default: the organism's)"
    )
    directions.add_argument(
        "--aggregation",
        default="pca",
        choices=["pca", "mean"],
        help="pca (PTI: first PC + mean; default) or mean",
    )
    directions.add_argument(
        "--components", type=int, default=1, help="principal components summed (default 1)"
    )
    directions.add_argument(
        "--from",
        dest="source",
        default="rlvr",
        choices=["rlvr", "base"],
        help="model whose cache is read and steered",
    )
    directions.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    directions.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from lens.interventions.pti_directions import DirectionConfig, check_path, compute_directions, sidecar
    from lens.organism.calibration import CALIBRATION_SEED, calibration_items
    from lens.outdir import check_writable

    # Everything a typo can break is checked before any weight loads or any byte is written.
    out = check_path(args.out)
    if not args.overwrite and (out.exists() or sidecar(out).exists()):
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    check_writable(str(out.parent), "--out")
    check_at_least(args.threads, "--threads")
    check_device(args.device)
    if args.shard is not None:
        raise ConfigError("lens pti directions is one process; --shard does not apply")
    config = DirectionConfig(aggregation=args.aggregation, n_components=args.components, model=args.source)
    seed = CALIBRATION_SEED if args.seed is None else args.seed
    items = calibration_items(args.n, seed)
    spec = inspect_pair(args)
    if not spec.multimodal:
        raise ConfigError("PTI steers image tokens; this pair takes no images")
    pair = load_pair_from_args(args)
    directions = compute_directions(
        pair, items, config, calibration={"source": args.calibration, "seed": seed}, progress=True
    )
    directions.save(out)
    layers, heads, dim = directions.shape
    print(f"wrote {out} and {sidecar(out).name}: {layers} layers x {heads} kv heads x {dim}, {args.n} items")
    return 0
