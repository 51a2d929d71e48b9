"""``lens perturb``: input noise against low-entropy KL drift and answer perplexity."""

from __future__ import annotations

import argparse
from pathlib import Path

from lens.commands.common import (
    add_pair_arguments,
    check_layers,
    check_resume,
    check_run_options,
    check_samples,
    inspect_pair,
    parse_layers,
)
from lens.commands.intervene import add_mask_arguments
from lens.commands.runs import run_job

KIND_CHOICES = {"pixel": ("pixel",), "embedding": ("embedding",), "both": ("pixel", "embedding")}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "perturb",
        help="noise on the image vs low-entropy drift and answer perplexity",
        description=(
            "Add Gaussian noise to the RLVR model's pixel values or visual embeddings; measure the "
            "low-entropy KL drift to the clean base and the teacher-forced perplexity of a correct and "
            "an incorrect answer; report Spearman correlations with bootstrap CIs."
        ),
    )
    add_pair_arguments(parser)
    parser.add_argument(
        "--data", default=None, help="JSONL dataset with answers (default: organism held-out)"
    )
    parser.add_argument("--items", type=int, default=40, help="held-out items when --data is not given")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples (N >= 1)")
    parser.add_argument(
        "--sigmas",
        default="0,0.05,0.1,0.2,0.4,0.8",
        help="noise magnitudes, comma-separated, >= 0 (0 is always included); default 0,0.05,0.1,0.2,0.4,0.8",
    )
    parser.add_argument(
        "--kind", default="both", choices=sorted(KIND_CHOICES), help="noise kind (default both)"
    )
    add_mask_arguments(parser)
    parser.add_argument("--layers", default=None, help="drift layers, e.g. 0-15 (default: first half)")
    parser.add_argument("--seed", type=int, default=0, help="noise and sampling seed (default 0)")
    parser.add_argument(
        "--incorrect",
        default="sampled",
        choices=["sampled", "offset"],
        help="incorrect answer: the model's own wrong samples (default) or always answer+1",
    )
    parser.add_argument(
        "--incorrect-file", default=None, help="JSON {sample_id: response} of supplied incorrect responses"
    )
    parser.add_argument(
        "--response-format",
        default="answer {answer}",
        help="how an answer is rendered as a response (default 'answer {answer}', the organism's)",
    )
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--out", default="runs/perturb", help="output folder (default: runs/perturb)")
    parser.add_argument("--no-resume", action="store_true", help="discard records already in --out")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from analyses.perturbation import (
        PerturbConfig,
        load_incorrect,
        parse_sigmas,
        run_perturbation,
    )
    from analyses.perturbation import check_samples as check_study_samples
    from lens.commands.drift import load_samples
    from lens.errors import ConfigError

    check_run_options(args)
    if "{answer}" not in args.response_format:
        raise ConfigError("--response-format must contain {answer}")
    config = PerturbConfig(
        sigmas=parse_sigmas(args.sigmas),
        kinds=KIND_CHOICES[args.kind],
        tau=args.tau,
        mask_rule=args.mask,
        quantile=args.quantile,
        layers=parse_layers(args.layers),
        seed=args.seed,
        incorrect=args.incorrect,
        n_boot=args.boot,
    )
    supplied = load_incorrect(args.incorrect_file) if args.incorrect_file else None
    samples = load_samples(args)
    # Before loading the models: a dataset without answers or images fails at once.
    check_study_samples(samples)
    spec = inspect_pair(args)
    check_layers(config.layers, spec.n_layers)
    check_samples(samples, spec, args.data, needs_image="perturbation of the image")
    check_resume(Path(args.out) / "records.jsonl", spec, args)
    titles = []

    def work(pair, resume, shard):
        titles.append(f"{pair.names[0]} → {pair.names[1]}")
        return run_perturbation(
            pair,
            samples,
            args.out,
            config,
            formatter=lambda answer: args.response_format.format(answer=answer),
            incorrect=supplied,
            resume=resume,
            progress=True,
            title=titles[0],
            shard=shard,
        )

    result = run_job(args, work, resume=not args.no_resume)
    if result is None:
        return 0
    title = titles[0]
    out = Path(args.out)
    sources = result.table.drop_duplicates("sample_id")["incorrect_source"].value_counts().to_dict()
    print(f"\n{len(samples)} samples, {title}; incorrect answers from: {sources}")
    print("geometric-mean PPL and mean low-entropy drift per noise level:")
    print(result.summary.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print("\nSpearman rho(low-entropy drift, PPL), 95% cluster-bootstrap CI:")
    for _, row in result.correlations.iterrows():
        print(
            f"  {row['noise_kind']:9s} {row['answer_kind']:9s} {row['scope']:13s} "
            f"rho={row['spearman_rho']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        )
    print(
        f"\nwrote {out / 'perturbation.png'} (+.pdf), perturb_table.csv, perturb_spearman.csv, records.jsonl"
    )
    return 0
