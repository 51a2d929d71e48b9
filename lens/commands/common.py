"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from typing import Any

from lens.errors import ConfigError


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """``--base``/``--rlvr``/``--dtype``/``--device``/``--threads``."""
    parser.add_argument("--base", default="organism", help="base checkpoint folder, or 'organism' (default)")
    parser.add_argument(
        "--rlvr",
        default=None,
        help="RLVR checkpoint folder; with --base organism: 'rlvr' (default) or 'control'",
    )
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype"
    )
    parser.add_argument("--device", default=None, help="device, e.g. cuda:0 (default: cpu)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``"0-15"``, ``"0,3,5"`` or ``"0-3,8"`` to a tuple of layer indices."""
    if text is None:
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                layers += range(int(lo), int(hi) + 1)
            elif part.strip():
                layers.append(int(part))
    except ValueError as exc:
        raise ConfigError(f"cannot parse layers {text!r}; use e.g. 0-15 or 0,3,5") from exc
    return tuple(layers)


def load_pair_from_args(args: argparse.Namespace) -> Any:
    import torch

    from lens.loading import load_pair

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.base != "organism" and args.rlvr is None:
        raise ConfigError("--rlvr is required when --base is a checkpoint folder")
    return load_pair(args.base, args.rlvr, dtype=args.dtype, device=args.device)
