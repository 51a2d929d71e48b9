"""``lens intervene``: decode with each intervention strategy and score greedy pass@1 and pass@k."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lens.commands.common import (
    add_data_arguments,
    add_decoding_arguments,
    add_pair_arguments,
    check_layers,
    check_resume,
    check_run_options,
    check_samples,
    check_scoring,
    check_topk,
    inspect_pair,
    parse_layers,
    read_items,
)
from lens.commands.runs import (
    model_set_options,
    run_comparisons,
    run_job,
    write_comparison_tables,
)
from lens.errors import ConfigError

#: Strategies that act on visual tokens, so every item needs an image.
VISUAL_STRATEGIES = ("hard-low", "hard-high", "replay", "replay-high", "pti")


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    """``--mask``/``--tau``/``--quantile``: the entropy mask rule shared by injection, replay and perturb."""
    parser.add_argument(
        "--mask",
        default="tau_max",
        metavar="RULE",
        help="entropy mask rule: tau_max (released: base entropy <= tau x the layer's max over visual "
        "tokens; default) or quantile (rank-based: <= the layer's q-quantile; use it when the "
        "entropies are near-uniform, e.g. on the organism)",
    )
    parser.add_argument("--tau", type=float, default=0.4, help="tau of the tau_max mask (default 0.4)")
    parser.add_argument(
        "--quantile", type=float, default=0.3, help="q of the quantile mask, in (0, 1) (default 0.3)"
    )


def add_run_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """Dataset, prompt, decoding and replay arguments shared by ``intervene`` and ``replay``."""
    add_data_arguments(parser, items_help="number of items (default: all of --data, 40 organism items)")
    parser.add_argument(
        "--n", type=int, default=8, help="samples per item for pass@k (default 8; 0: greedy only)"
    )
    parser.add_argument("--k", default="1,2,4,8", help="pass@k budgets, comma-separated (default 1,2,4,8)")
    add_decoding_arguments(parser)
    add_mask_arguments(parser)
    parser.add_argument("--alpha", type=float, default=10.0, help="replay step size (default 10)")
    parser.add_argument("--steps", type=int, default=25, help="replay gradient steps (default 25)")
    parser.add_argument("--topk", type=int, default=50, help="replay top-k (default 50)")
    parser.add_argument(
        "--variant", default="released", choices=["released", "paper"], help="replay depth pairing"
    )
    parser.add_argument(
        "--layers", default=None, help="layers, e.g. 0-15 (default: the first 16/28 of the model)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--out", default=out, help=f"output folder (default: {out})")
    parser.add_argument("--no-resume", action="store_true", help="discard records already in --out")


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    from lens.errors import ConfigError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"cannot parse {what} {text!r}; use e.g. 0.2,0.4") from exc


def run_config(args: argparse.Namespace, strategies: tuple[str, ...]):
    from analyses.intervention import InterventionRunConfig

    return InterventionRunConfig(
        strategies=strategies,
        layers=parse_layers(args.layers),
        tau=args.tau,
        mask_rule=args.mask,
        quantile=args.quantile,
        alpha=args.alpha,
        steps=args.steps,
        topk=args.topk,
        variant=args.variant,
        n=args.n,
        ks=tuple(int(k) for k in parse_floats(args.k, "--k")) if args.n else (),
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        prompt=args.prompt,
        system=args.system,
        verifier=args.verifier,
        pti_directions=getattr(args, "pti_directions", None),
        vreason_lr=getattr(args, "vreason_lr", 0.01),
        vreason_every=getattr(args, "vreason_every", 2),
        vreason_lite=getattr(args, "vreason_lite", False),
    )


def load_items(args: argparse.Namespace) -> list:
    """The first ``--items`` items of ``--data`` (all by default; else 40 organism items), images opened once."""
    return read_items(args, organism_default=40)


def check_before_loading(args: argparse.Namespace, config, strategies: tuple[str, ...]) -> tuple[list, Any]:
    """Every check that needs no weights; returns the samples and, for several twins, their
    :class:`lens.commands.common.SetSpec` (else ``None``).

    The interventions are built once against the layer count read from ``config.json``, which
    validates every replay and injection hyper-parameter before the models load.
    """
    from analyses.intervention import make_intervention

    check_run_options(args)
    models = model_set_options(args)
    samples = load_items(args)
    spec = inspect_pair(args) if models is None else models.spec
    check_layers(config.layers, spec.n_layers)
    visual = [s for s in strategies if s in VISUAL_STRATEGIES]
    if any(s.startswith("replay") for s in strategies):
        check_topk(config.topk, spec.vocab_size)
    if "pti" in strategies:
        check_pti_directions(config.pti_directions, spec)
    for strategy in strategies:
        make_intervention(strategy, config, spec.n_layers)
    check_samples(
        samples, spec, args.data, needs_image=f"--strategies {','.join(visual)}" if visual else None
    )
    if "vreason" in strategies:
        check_video_items(samples, args.data)
    check_scoring(samples, config.verifier)
    if models is None:
        check_resume(Path(args.out) / "records.jsonl", spec, args)
    elif getattr(args, "shard_spec", None) is not None:
        raise ConfigError("several twins cannot be sharded in one run yet; give one --rlvr per sharded run")
    return samples, models


def check_video_items(samples: list, data: Any) -> None:
    """Refuse, before any weight loads, items without a video: V-Reason acts on video tokens."""
    from lens.commands.common import where
    from lens.errors import InputError

    for sample in samples:
        if getattr(sample, "video", None) is None:
            raise InputError(
                f"{where(sample, data)} has no video, but --strategies vreason acts on video tokens"
            )


def check_pti_directions(path: str | None, spec: Any) -> None:
    """Refuse, from the sidecar alone, PTI directions made for other checkpoints or another depth."""
    from lens.interventions.pti_directions import check_same_pair, read_meta

    if path is None:
        raise ConfigError("--strategies pti needs --pti-directions FILE (make it with `lens pti directions`)")
    meta = read_meta(path)
    if len(spec.checkpoints) == 2:
        check_same_pair(
            meta["checkpoints"], meta.get("names", ("base", "rlvr")), spec.checkpoints, spec.sources
        )
    if meta["shape"][0] != spec.n_layers:
        raise ConfigError(
            f"{path}: PTI directions for {meta['shape'][0]} layers, the pair has {spec.n_layers}"
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    from analyses.intervention import DEFAULT_STRATEGIES, STRATEGIES

    parser = subparsers.add_parser(
        "intervene",
        help="hard injection / Activation Replay, scored with greedy pass@1 and pass@k",
        description="Decode with each strategy (rlvr, base, hard-low, hard-high, replay, replay-high, "
        "pti with --pti-directions, and vreason on video items) "
        "and score greedy pass@1 and sampled pass@k with bootstrap CIs.",
    )
    add_pair_arguments(parser, several=True)
    add_run_arguments(parser, "runs/intervene")
    parser.add_argument(
        "--strategies",
        default=",".join(DEFAULT_STRATEGIES),
        help=f"comma-separated, of {','.join(STRATEGIES)} (default: {','.join(DEFAULT_STRATEGIES)})",
    )
    parser.add_argument(
        "--pti-directions",
        default=None,
        metavar="FILE",
        help="PTI steering directions (.safetensors from `lens pti directions`), for --strategies pti",
    )
    parser.add_argument(
        "--vreason-lr", type=float, default=0.01, help="V-Reason learning rate (Adam; default 0.01)"
    )
    parser.add_argument(
        "--vreason-every",
        type=int,
        default=2,
        metavar="K",
        help="V-Reason: update the controller every K generated tokens (default 2)",
    )
    parser.add_argument(
        "--vreason-lite",
        action="store_true",
        help="V-Reason (Lite): also prune the half of the video tokens with the lowest value norm",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from analyses.intervention import run_interventions, wide_table

    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    config = run_config(args, strategies)
    samples, models = check_before_loading(args, config, strategies)
    if models is not None:
        return run_twins(args, config, models, samples)
    titles = []

    def work(pair, resume, shard):
        titles.append(f"{pair.names[0]} → {pair.names[1]}")
        return run_interventions(
            pair, samples, args.out, config, resume=resume, progress=True, title=titles[0], shard=shard
        )

    result = run_job(args, work, resume=not args.no_resume)
    if result is None:
        return 0
    title = titles[0]
    print(f"\n{len(samples)} items, {title}, mask {config.mask.describe()}; value [95% bootstrap CI]:")
    print(wide_table(result.summary).to_string())
    print(f"\nwrote {Path(args.out)}/summary.csv, per_item.csv, records.jsonl, pass_at_k.png")
    return 0


def run_twins(args: argparse.Namespace, config, models, samples: list) -> int:
    """Every strategy on each twin (against its base), one folder per twin, one stacked summary."""
    from analyses.intervention import run_interventions, wide_table

    def work(pair, out, resume):
        title = f"{pair.names[0]} → {pair.names[1]}"
        return run_interventions(pair, samples, out, config, resume=resume, progress=True, title=title)

    results = run_comparisons(args, models, work)
    write_comparison_tables(args.out, {"summary": {c: r.summary for c, r in results.items()}})
    for (reference, other), result in results.items():
        print(
            f"\n{len(samples)} items, {reference} → {other}, mask {config.mask.describe()}; value [95% bootstrap CI]:"
        )
        print(wide_table(result.summary).to_string())
    print(f"\nwrote {Path(args.out)}/summary.csv (a comparison column) and one folder per twin")
    return 0
