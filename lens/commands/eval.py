"""``lens eval``: greedy pass@1 and sampled pass@k of a pair's models, with bootstrap CIs and a figure."""

from __future__ import annotations

import argparse
from pathlib import Path

from lens.errors import ConfigError

KNOWN_PAIRS = ("organism",)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lens eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="pass@1 / pass@k of base, rlvr and control with bootstrap CIs",
        description="Greedy pass@1 and unbiased pass@k (n samples at temperature 1) per model and question "
        "type, with bootstrap 95%% CIs and paired CIs for twin - base.",
    )
    parser.add_argument("--pair", default="organism", help="pair to evaluate (known: organism)")
    parser.add_argument(
        "--k", default="1,4,8,16", help="comma-separated k values, each <= --n (default 1,4,8,16)"
    )
    parser.add_argument("--n", type=int, default=16, help="samples per item at temperature 1.0 (default 16)")
    parser.add_argument("--items", type=int, default=500, help="held-out items (default 500)")
    parser.add_argument("--out", default="results/eval", help="output folder (default results/eval)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: per-item batches are too small to share)",
    )
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

    if args.pair not in KNOWN_PAIRS:
        raise ConfigError(f"unknown pair {args.pair!r}; known pairs: {', '.join(KNOWN_PAIRS)}")
    check_run_options(args)
    return EvalConfig(ks=parse_ks(args.k), n=args.n, seed=args.seed)


def run_eval(args: argparse.Namespace) -> int:
    """Handler of ``lens eval``."""
    cfg = check_args(args)
    import torch

    from analyses.evaluate import evaluate, record_key, wide_table, write_outputs
    from lens import organism
    from lens.fingerprint import models_fingerprint, sample_digest
    from lens.organism.model import Encoder
    from lens.outdir import OutputFolder
    from lens.records import RecordWriter

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    samples = organism.heldout(args.items)
    with OutputFolder(out):
        loaded = {name: organism.load_model(name) for name in organism.MODEL_NAMES}
        encoder = Encoder(loaded["base"][1])
        models = {name: m for name, (m, _, _) in loaded.items()}
        tag = f"n{cfg.n}-seed{cfg.seed}-items{args.items}"
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
            write_outputs(result, out, title=f"organism, {args.items} held-out items, n={cfg.n}")
    print(wide_table(result.summary).to_string())
    d = result.differences
    if len(d):
        d = d[d["qtype"] == "all"]
        print("\npaired twin - base (all question types):")
        for r in d.itertuples():
            print(
                f"  {r.twin:8s} {r.metric:14s} k={r.k:<3d} {r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
            )
    print(f"\nwrote {out}/summary.csv, differences.csv, per_item.csv, table.md, pass_at_k.png/.pdf")
    return 0
