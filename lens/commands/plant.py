"""``lens plant``: save a planted twin (the base plus a known weight edit) as a checkpoint folder."""

from __future__ import annotations

import argparse

from lens.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plant",
        help="save the base plus a known weight edit as a checkpoint (planted ground truth)",
        description=(
            "Write a copy of the base checkpoint whose weights add a fixed random offset (RMS --size, "
            "absolute residual units, direction seeded by --seed) at the input of block 0: at every "
            "visual token (--where visual: the vision projector's output bias) or at every text token "
            "(--where text: the embedding rows). Load it as the twin, e.g. `lens drift --base organism "
            "--rlvr OUT`. Plants chosen by entropy rank, fraction or layer are hook plants "
            "(lens.controls.plant), not weight edits."
        ),
    )
    parser.add_argument("--base", default="organism", help="base checkpoint folder, or 'organism' (default)")
    parser.add_argument("--where", required=True, choices=["visual", "text"], help="where the offset goes")
    parser.add_argument("--size", type=float, required=True, help="RMS of the offset (absolute, >= 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the offset's direction (default 0)")
    parser.add_argument("--out", required=True, help="the new checkpoint folder")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="dtype (default: the base's)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once done")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from lens.planted_checkpoint import WeightPlant, plant_checkpoint

    plant = WeightPlant(where=args.where, size=args.size, seed=args.seed)
    if args.base == "organism":
        from lens import organism

        base = str(organism.model_dir("base"))
    else:
        base = args.base
    if not args.out:
        raise ConfigError("--out must name a folder")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = plant_checkpoint(base, args.out, plant, dtype=dtype, overwrite=args.overwrite)
    twin = f"--base organism --rlvr {out}" if args.base == "organism" else f"--base {base} --rlvr {out}"
    print(f"planted {plant.where} offset of RMS {plant.size:g} (seed {plant.seed}) into {out}")
    print(f"compare it with its base: lens drift {twin} --out runs/planted")
    return 0
