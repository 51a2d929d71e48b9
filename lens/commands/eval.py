"""``lens eval``: greedy pass@1 and sampled pass@k of a pair's models, with bootstrap CIs and a figure."""

from __future__ import annotations

import argparse
from pathlib import Path

from lens.commands.common import (
    add_data_arguments,
    add_decoding_arguments,
    add_pair_arguments,
)
from lens.errors import ConfigError

KNOWN_PAIRS = ("organism",)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lens eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="pass@1 / pass@k of a pair (the organism: base, rlvr and control) with bootstrap CIs",
        description="Greedy pass@1 and unbiased pass@k (n samples) per model and question type, with "
        "bootstrap 95% CIs and paired CIs for twin - base. With no --rlvr, --data or prompt options on the "
        "organism, evaluates its three models (base, rlvr, control) on its held-out set.",
    )
    add_pair_arguments(parser, several=True)
    parser.add_argument(
        "--pair",
        default=None,
        help=argparse.SUPPRESS,  # older spelling of --base organism
    )
    add_data_arguments(parser, items_help="items (default: all of --data, 500 organism items)")
    add_decoding_arguments(parser)
    parser.add_argument(
        "--k", default="1,4,8,16", help="comma-separated k values, each <= --n (default 1,4,8,16)"
    )
    parser.add_argument(
        "--n", type=int, default=16, help="samples per item (default 16; 0: greedy only, with --data)"
    )
    parser.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    parser.add_argument(
        "--fresh",
        "--no-resume",
        dest="fresh",
        action="store_true",
        help="ignore per-item records of an earlier run",
    )
    parser.set_defaults(handler=run_eval)


def parse_ks(text: str) -> tuple[int, ...]:
    """``"1,4,8,16"`` to ``(1, 4, 8, 16)``."""
    try:
        ks = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError as exc:
        raise ConfigError(f"cannot parse --k {text!r}; use e.g. 1,4,8,16") from exc
    if not ks:
        raise ConfigError("--k needs at least one value")
    return ks


def check_args(args: argparse.Namespace):
    """Validate the arguments before anything is loaded or written; returns the :class:`EvalConfig`."""
    from analyses.evaluate import EvalConfig
    from lens.commands.common import check_run_options

    if args.pair is not None and args.pair not in KNOWN_PAIRS:
        raise ConfigError(f"unknown pair {args.pair!r}; known pairs: {', '.join(KNOWN_PAIRS)}")
    check_run_options(args)
    return EvalConfig(ks=parse_ks(args.k), n=args.n, seed=args.seed)


def organism_trio(args: argparse.Namespace) -> bool:
    """Whether this is the organism's own evaluation (its three models on its held-out set)."""
    plain = args.prompt is None and args.system is None and args.verifier == "auto" and args.columns is None
    from lens.organism import VARIANTS

    return args.base in VARIANTS and args.rlvr is None and args.data is None and plain


def run_eval(args: argparse.Namespace) -> int:
    """Handler of ``lens eval``."""
    if args.pair is not None and args.pair not in KNOWN_PAIRS:
        raise ConfigError(f"unknown pair {args.pair!r}; known pairs: {', '.join(KNOWN_PAIRS)}")
    if organism_trio(args) and getattr(args, "models", None) is None:
        return run_organism_eval(args)
    return run_pair_eval(args)


def run_pair_eval(args: argparse.Namespace) -> int:
    """Any pair on any dataset: both models as they are, batched greedy, ``--n`` samples, scored."""
    from analyses.evaluate import summarise_runs, wide_table, write_outputs
    from analyses.intervention import InterventionRunConfig, make_intervention, run_settings
    from lens.commands.common import (
        apply_threads,
        check_resume,
        check_run_options,
        check_samples,
        check_scoring,
        inspect_pair,
        read_items,
    )
    from lens.commands.runs import (
        load_set_from_args,
        model_set_options,
        run_job,
    )

    if args.n < 0:
        raise ConfigError(f"--n must be >= 0, got {args.n}")
    ks = parse_ks(args.k) if args.n else ()
    check_run_options(args)
    config = InterventionRunConfig(
        strategies=("base", "rlvr"),
        n=args.n,
        ks=ks,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        prompt=args.prompt,
        system=args.system,
        verifier=args.verifier,
    )
    models = model_set_options(args)
    samples = read_items(args, organism_default=500)
    spec = inspect_pair(args) if models is None else models.spec
    check_samples(samples, spec, args.data)
    check_scoring(samples, config.verifier)
    out = Path(args.out)
    if models is None:
        check_resume(out / "records.jsonl", spec, args)
    apply_threads(args)
    titles = []

    def work(pair, resume, shard):
        pairs = None
        if models is None:
            interventions = [(s, make_intervention(s, config, pair.n_layers)) for s in config.strategies]
            base_name = "base"
        else:  # the base decoded once, then every twin, each as it is
            base_name, first = pair.comparisons[0]
            pairs = {
                base_name: pair.pair(base_name, first),
                **{m: pair.pair(base_name, m) for m in pair.names[1:]},
            }
            interventions = [(base_name, make_intervention("base", config, pair.n_layers))]
            interventions += [(m, make_intervention("rlvr", config, pair.n_layers)) for m in pair.names[1:]]
        runs = run_settings(
            pair, samples, interventions, config, out, resume, progress=True, shard=shard, pairs=pairs,
            progress_label="eval",
        )
        if runs is None:
            return None
        result = summarise_runs(runs, ks, base=base_name, seed=args.seed)
        titles.append(f"{' / '.join(pair.names)}, {len(samples)} items")
        write_outputs(result, out, title=titles[0])
        return result

    load = None if models is None else (lambda device: load_set_from_args(args, models, device))
    result = run_job(args, work, resume=not args.fresh, load=load)
    if result is None:
        return 0
    title = titles[0]
    print(f"\n{title}; value [95% bootstrap CI]:")
    print(wide_table(result.summary).to_string())
    print_differences(result)
    figure = ", pass_at_k.png/.pdf" if args.n else ""
    print(f"\nwrote {out}/summary.csv, differences.csv, per_item.csv, table.md{figure}, records.jsonl")
    return 0


def print_differences(result) -> None:
    d = result.differences
    if len(d):
        d = d[d["qtype"] == "all"]
        print("\npaired twin - base (all question types):")
        for r in d.itertuples():
            print(
                f"  {r.twin:8s} {r.metric:14s} k={r.k:<3d} {r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
            )


def run_organism_eval(args: argparse.Namespace) -> int:
    """The organism's three models on its held-out set (the README's table)."""
    cfg = check_args(args)
    import torch

    from analyses.evaluate import evaluate, record_key, wide_table, write_outputs
    from lens import organism
    from lens.fingerprint import models_fingerprint, sample_digest
    from lens.outdir import OutputFolder
    from lens.records import RecordWriter

    # One thread by default: the per-item batches are too small to share between cores.
    torch.set_num_threads(args.threads or 1)
    out = Path(args.out)
    items = args.items or 500
    samples = organism.heldout_of(args.base, items)
    with OutputFolder(out):
        loaded = {name: organism.load_model(name, args.base) for name in organism.MODEL_NAMES}
        encoder = organism.encoder_of(args.base, loaded["base"][1])
        models = {name: m for name, (m, _, _) in loaded.items()}
        tag = f"n{cfg.n}-seed{cfg.seed}-items{items}"
        digests = {str(s.id): sample_digest(s) for s in samples}
        writer = RecordWriter(
            out / f"records-{tag}.jsonl",
            resume=not args.fresh,
            settings={"n": cfg.n, "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens},
            fingerprint=models_fingerprint(models),
            inputs={record_key(m, i): d for m in models for i, d in digests.items()},
        )
        with writer:
            result = evaluate(models, encoder, samples, organism.verify, cfg, writer=writer, progress=True)
            write_outputs(result, out, title=f"{args.base}, {items} held-out items, n={cfg.n}")
    print(wide_table(result.summary).to_string())
    print_differences(result)
    print(f"\nwrote {out}/summary.csv, differences.csv, per_item.csv, table.md, pass_at_k.png/.pdf")
    return 0
