"""Running a command's work: claiming ``--out``, loading the models, sharding and merging, and
runs over several models (twins of one base, or stages).

:mod:`lens.commands.common` holds the arguments and the checks made before anything loads; this
module is what happens after them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens.commands.common import PairSpec, apply_threads, inspect_pair, load_pair_from_args, video_options
from lens.errors import ConfigError, ReplayLensError


def run_job(
    args: argparse.Namespace,
    work: Callable[[Any, bool, Any], Any],
    resume: bool,
    load: Callable[[str | None], Any] | None = None,
) -> Any:
    """Claim ``--out``, load the pair and run ``work(pair, resume, shard)``; in a sharded run, merge.

    Single process: ``work`` runs with ``shard=None`` and returns the run's result. Sharded
    (``--shard``, torchrun, accelerate launch): this process claims its shard folder, ``work``
    computes its records there (returning ``None``), and :func:`lens.distributed.finish` merges when
    this process is the one to (rank 0, or the last ``--shard`` job); that process then runs
    ``work`` once more on the merged records, which computes nothing and writes the tables.

    ``load(device)`` loads the models (default: the pair of ``--base``/``--rlvr``).

    Returns:
        The result, or ``None`` in a shard process that did not merge.
    """
    from lens import distributed
    from lens.outdir import OutputFolder

    if load is None:

        def load(device: str | None) -> Any:
            return load_pair_from_args(args, device=device)

    shard = getattr(args, "shard_spec", None)
    if shard is None:
        with OutputFolder(args.out):
            return work(load(None), resume, None)
    with OutputFolder(shard.folder(args.out), "--out"):
        pair = load(shard.device(args.device))
        work(pair, resume, shard)
    report = distributed.finish(args.out, shard)
    if report is None:
        merger = (
            "rank 0 merges" if shard.launched else "the last shard to finish merges (or run `lens merge OUT`)"
        )
        print(f"shard {shard}: its records are in {shard.folder(args.out)}; {merger}", file=sys.stderr)
        return None
    print(
        f"merged {len(report.shards)} shard(s) into {args.out}: {report.merged} new records, "
        f"{report.kept} kept from earlier runs",
        file=sys.stderr,
    )
    with OutputFolder(args.out):
        return work(pair, True, None)


# -- several models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetSpec:
    """The models of a several-model run, from the options, before any weight loads.

    Attributes:
        sources: Checkpoint folders by model name, the reference first.
        shape: ``"twins"`` (repeated ``--rlvr``) or ``"stages"`` (``--models``).
        spec: The first comparison's :class:`PairSpec` (layers, vocabulary, image processor).
        organism: Whether the models are the built-in organism's.
    """

    sources: dict[str, str]
    shape: str
    spec: PairSpec
    organism: bool = False


def model_set_options(args: argparse.Namespace) -> SetSpec | None:
    """Read repeated ``--rlvr`` or ``--models`` and check every model against the first, from their
    files alone; ``None`` for a plain pair (``args.rlvr`` is then a single folder or ``None``).

    Raises:
        ConfigError: ``--models`` with ``--base``/``--rlvr``, a malformed ``NAME=DIR``, a name or twin
            given twice, or fewer than two models.
        CheckpointError / PairMismatchError / UnsupportedArchitectureError: A model that cannot be
            compared with the first, named.
    """
    from lens.modelset import comparisons_for, organism_sources
    from lens.organism import VARIANTS

    twins = list(args.rlvr or [])
    models = getattr(args, "models", None)
    if models is None and len(twins) <= 1:
        args.rlvr = twins[0] if twins else None
        return None
    if models is not None:
        if twins or args.base not in VARIANTS:
            raise ConfigError("--models names every model; leave out --base and --rlvr")
        sources: dict[str, str] = {}
        for item in models:
            name, sep, folder = item.partition("=")
            if not sep or not name.strip() or not folder.strip():
                raise ConfigError(
                    f"--models {item!r}: use NAME=DIR, e.g. --models base=/ckpt/b sft=/ckpt/s rl=/ckpt/r"
                )
            if name.strip() in sources:
                raise ConfigError(f"--models names stage {name.strip()!r} twice")
            sources[name.strip()] = folder.strip()
        shape, organism_run = "stages", False
    elif args.base in VARIANTS:
        sources, shape, organism_run = organism_sources(twins, args.base), "twins", True
        if len(set(twins)) < len(twins):
            raise ConfigError(f"--rlvr {sorted(t for t in twins if twins.count(t) > 1)[0]!r} is given twice")
    else:
        names = [Path(t).name or t for t in twins]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"two --rlvr twins are named {repeated[0]!r}; give each twin once")
        base_name = Path(args.base).name or "base"
        if base_name in names:
            base_name = "base"
        sources, shape, organism_run = (
            {base_name: args.base, **dict(zip(names, twins, strict=True))},
            "twins",
            False,
        )
    comparisons = comparisons_for(list(sources), shape)
    first = None
    for reference, other in comparisons:
        probe = argparse.Namespace(**{**vars(args), "base": sources[reference], "rlvr": sources[other]})
        try:
            spec = inspect_pair(probe)
        except ReplayLensError as exc:
            raise type(exc)(f"{other!r} against {reference!r}: {exc}") from None
        first = first or spec
    assert first is not None
    return SetSpec(sources, shape, first, organism_run)


def load_set_from_args(args: argparse.Namespace, models: SetSpec, device: str | None = None) -> Any:
    """Load the :class:`lens.modelset.ModelSet` of :func:`model_set_options`."""
    from lens.modelset import load_models

    apply_threads(args)
    image_first = True
    if models.organism:
        from lens import organism

        image_first = organism.IMAGE_FIRST
    model_set = load_models(
        models.sources,
        models.shape,
        dtype=args.dtype,
        device=device or args.device,
        device_map=getattr(args, "device_map", None),
        image_first=image_first,
    )
    model_set.video_options = video_options(args)
    return model_set


def run_comparisons(
    args: argparse.Namespace, models: SetSpec, work: Callable[[Any, Path, bool], Any]
) -> dict[tuple[str, str], Any]:
    """Several twins in ``intervene``/``replay``: the models load once, and each comparison's run
    (``work(pair, out, resume)``) goes to its own folder, ``OUT/<twin>`` (``OUT/<ref>-to-<twin>`` for
    stages), with its own records and tables.

    Raises:
        ConfigError: Under ``--shard`` or a launcher (shard one twin per job instead).
    """
    from lens.outdir import OutputFolder

    if getattr(args, "shard_spec", None) is not None:
        raise ConfigError("several twins cannot be sharded in one run yet; give one --rlvr per sharded run")
    results: dict[tuple[str, str], Any] = {}
    with OutputFolder(args.out):
        model_set = load_set_from_args(args, models)
        for reference, other in model_set.comparisons:
            folder = other if models.shape == "twins" else f"{reference}-to-{other}"
            results[(reference, other)] = work(
                model_set.pair(reference, other), Path(args.out) / folder, not args.no_resume
            )
    return results


def write_comparison_tables(out: str | Path, tables: dict[str, dict[tuple[str, str], Any]]) -> None:
    """Stack each table of every comparison (:func:`lens.modelset.stack_comparisons`) into
    ``OUT/<name>.csv``."""
    from lens.modelset import stack_comparisons
    from lens.records import write_tables

    write_tables(out, {name: stack_comparisons(by_comparison) for name, by_comparison in tables.items()})
