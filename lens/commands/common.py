"""Arguments and checks shared by the subcommands.

Every command validates everything it can before it loads a weight or writes a byte: numeric
options, the device, ``--out``, the dataset (images opened, sizes the processor accepts), and, from
the checkpoints' ``config.json`` and weight-file headers alone (:func:`inspect_pair`), the layers,
top-k and whether the pair takes images. Only then does it claim ``--out``
(:class:`lens.outdir.OutputFolder`) and load the models.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens.errors import ConfigError, InputError, ReplayLensError

#: Device types a pair can be loaded onto, with the torch module that says whether one is present.
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def add_pair_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """``--base``/``--rlvr``/``--dtype``/``--device``/``--threads`` (and, with ``several``, repeated
    ``--rlvr`` twins and ``--models`` stages)."""
    parser.add_argument("--base", default="organism", help="base checkpoint folder, or 'organism' (default)")
    if several:
        parser.add_argument(
            "--rlvr",
            action="append",
            default=None,
            help="RLVR checkpoint folder; with --base organism: 'rlvr' (default) or 'control'. Repeat it "
            "to read several twins against the base in one run (the base runs once per sample)",
        )
        parser.add_argument(
            "--models",
            nargs="+",
            default=None,
            metavar="NAME=DIR",
            help="stages of one model, in order, e.g. base=DIR sft=DIR rl=DIR: compares each consecutive "
            "pair and the first with the last (replaces --base/--rlvr)",
        )
    else:
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
    parser.add_argument(
        "--device-map",
        default=None,
        choices=["auto", "balanced", "sequential"],
        help="spread each model over this process's GPUs (accelerate), for pairs too large for one",
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="compute shard I of N (records I, I+N, ...) into OUT/shards/, for job arrays; the last "
        "shard to finish merges (or `lens merge OUT`). Under torchrun/accelerate launch the ranks "
        "split the run without this option",
    )


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``"0-15"``, ``"0,3,5"`` or ``"0-3,8"`` to a tuple of layer indices."""
    if text is None:
        return None
    layers: list[int] = []
    empty: list[str] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:  # a range (a leading minus is a negative index, refused later)
                lo, hi = (int(x) for x in part.strip().split("-", 1))
                layers += range(lo, hi + 1)
                empty += [part.strip()] if hi < lo else []
            elif part.strip():
                layers.append(int(part))
    except ValueError as exc:
        raise ConfigError(f"cannot parse --layers {text!r}; use e.g. 0-15 or 0,3,5") from exc
    if empty:
        raise ConfigError(f"--layers range {empty[0]!r} is empty (it ends before it starts)")
    if not layers:
        raise ConfigError(f"--layers {text!r} names no layer; use e.g. 0-15 or 0,3,5")
    return tuple(layers)


# -- plain options -----------------------------------------------------------------------------------


def check_at_least(value: int | None, option: str, minimum: int = 1) -> None:
    """Refuse ``value < minimum`` (``None`` means "not given" and passes)."""
    if value is not None and value < minimum:
        raise ConfigError(f"{option} must be >= {minimum}, got {value}")


def check_device(text: str | None) -> str | None:
    """Refuse a device string torch cannot parse, an unsupported type, or one absent on this machine."""
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {text!r} is not a device; use e.g. cpu, cuda, cuda:1 or mps") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"--device {text!r}: unsupported device type; use one of {', '.join(DEVICE_TYPES)}")
    if device.type == "cpu":
        return text
    backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    if backend is None or not backend.is_available():
        built = (
            " (this torch was built without CUDA)" if device.type == "cuda" and not torch.version.cuda else ""
        )
        raise ConfigError(f"--device {text}: no {device.type} device is available on this machine{built}")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {text}: only {count} {device.type} device(s) here (0..{count - 1})")
    return text


def check_run_options(args: argparse.Namespace) -> None:
    """The options most commands share: ``--threads``, ``--device``, ``--items``, ``--limit``, ``--out``."""
    from lens.outdir import check_writable

    check_at_least(getattr(args, "threads", None), "--threads")
    for option in ("items", "limit", "buckets", "boot"):
        check_at_least(getattr(args, option, None), f"--{option}")
    check_device(getattr(args, "device", None))
    if getattr(args, "out", None) is not None:
        check_writable(args.out, "--out")
    check_shard(args)


def check_shard(args: argparse.Namespace) -> None:
    """Resolve this process's shard (``--shard``, or torchrun's environment) into ``args.shard_spec``.

    Raises:
        ConfigError: A malformed ``--shard``, ``--shard`` under a launcher, or unmerged shards of
            another split in ``--out``.
    """
    from lens import distributed

    shard = distributed.resolve(getattr(args, "shard", None))
    if shard is not None and getattr(args, "out", None) is not None:
        distributed.check_out(args.out, shard)
        device = shard.device(getattr(args, "device", None))
        if device != getattr(args, "device", None):
            check_device(device)
    args.shard_spec = shard


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from ``--threads`` (validated by :func:`check_run_options`)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


# -- the pair, from its files --------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSpec:
    """What a pair's files say before any weight is loaded.

    Attributes:
        sources: Base and RLVR checkpoint folders (or hub ids).
        adapter: The family adapter.
        n_layers: Decoder layers.
        vocab_size: Rows of the unembedding.
        image_processor: The RLVR checkpoint's image processor (``None`` for text-only pairs).
        checkpoints: Identities of local checkpoint folders by role (:mod:`lens.fingerprint`).
    """

    sources: tuple[str, str]
    adapter: Any
    n_layers: int
    vocab_size: int
    image_processor: Any | None
    checkpoints: dict[str, Any]

    @property
    def multimodal(self) -> bool:
        return bool(self.adapter.multimodal)


def pair_sources(args: argparse.Namespace) -> tuple[str, str]:
    """Base and RLVR checkpoint folders (or hub ids) named by ``--base``/``--rlvr``.

    Raises:
        ConfigError: ``--rlvr`` missing for a checkpoint-folder base.
        CheckpointError: A folder that does not exist or has no ``config.json``.
    """
    from lens.loading import _resolve

    if args.base == "organism":
        from lens import organism

        twin = args.rlvr or "rlvr"
        if twin not in organism.KNOWN_PAIRS:
            raise ConfigError(f"unknown organism twin {twin!r}; known: {', '.join(organism.KNOWN_PAIRS)}")
        return str(organism.model_dir("base")), str(organism.model_dir(twin))
    if args.rlvr is None:
        raise ConfigError("--rlvr is required when --base is a checkpoint folder")
    return _resolve(args.base), _resolve(args.rlvr)


def inspect_pair(args: argparse.Namespace) -> PairSpec:
    """Read both checkpoints' configs, the image processor and the weight files' headers; load no weight.

    Raises:
        CheckpointError: A missing folder, an unreadable config, or a truncated weight file.
        UnsupportedArchitectureError: A family without an adapter.
        PairMismatchError: Configs that cannot be compared.
    """
    from lens.adapters import adapter_for
    from lens.fingerprint import checkpoint_identity
    from lens.loading import _load_config, _load_image_processor, check_configs

    sources = pair_sources(args)
    base_cfg, rlvr_cfg = (_load_config(s) for s in sources)
    check_configs(base_cfg, rlvr_cfg)
    adapter = adapter_for(rlvr_cfg)
    processor = _load_image_processor(sources[1]) if adapter.multimodal else None
    checkpoints = {
        role: checkpoint_identity(src)
        for role, src in zip(("base", "rlvr"), sources, strict=True)
        if Path(src).is_dir()
    }
    return PairSpec(
        sources=sources,
        adapter=adapter,
        n_layers=adapter.num_layers(rlvr_cfg),
        vocab_size=adapter.vocab_size(rlvr_cfg),
        image_processor=processor,
        checkpoints=checkpoints,
    )


def check_layers(layers: Iterable[int] | None, n_layers: int, option: str = "--layers") -> None:
    """Refuse layer indices outside ``0..n_layers-1``."""
    if layers is None:
        return
    bad = sorted({i for i in layers if not 0 <= i < n_layers})
    if bad:
        raise ConfigError(f"{option} {bad} outside the model's {n_layers} layers (0..{n_layers - 1})")


def check_topk(topk: int, vocab_size: int, option: str = "--topk") -> None:
    """Refuse a top-k outside ``1..vocab_size``."""
    if not 1 <= topk <= vocab_size:
        raise ConfigError(f"{option} must be in 1..{vocab_size} (the vocabulary size), got {topk}")


def check_resume(records: str | Path, spec: PairSpec, args: argparse.Namespace) -> None:
    """Refuse early, before loading, a resume whose stored fingerprint names other models.

    The record writer checks again against the loaded pair; this only saves loading the weights of a
    run that will be refused anyway.
    """
    from lens.fingerprint import describe_changes, fingerprint

    settings = Path(records).with_name(Path(records).stem + ".settings.json")
    if getattr(args, "no_resume", False) or not Path(records).exists() or not settings.exists():
        return
    try:
        stored = json.loads(settings.read_text(encoding="utf-8")).get("fingerprint")
    except (ValueError, AttributeError):
        return  # the writer reports it
    if not stored or len(spec.checkpoints) < 2:
        return
    wanted = fingerprint(spec.checkpoints, args.dtype or "float32", args.device or "cpu")
    changes = describe_changes(stored, wanted)
    if changes:
        raise ConfigError(
            f"{records} holds records made with other models: {'; '.join(changes)}; "
            "rerun with --no-resume or use another output folder"
        )


# -- samples ---------------------------------------------------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser, items_help: str) -> None:
    """``--data``/``--columns``/``--items`` and the prompt: ``--prompt``/``--system``/``--verifier``."""
    parser.add_argument(
        "--data",
        default=None,
        help="dataset: JSONL, VLMEvalKit TSV, Parquet, or a datasets.save_to_disk folder "
        "(default: the organism's held-out set)",
    )
    parser.add_argument(
        "--columns",
        default=None,
        metavar="MAP",
        help="field=column names where the file differs, e.g. question=query,answer=gt,image=decoded_image",
    )
    parser.add_argument("--items", type=int, default=None, help=items_help)
    parser.add_argument(
        "--prompt",
        default=None,
        metavar="PRESET",
        help="prompt preset (system prompt, question layout): plain, mm-eureka, vl-rethinker, "
        "vl-rethinker-card, thinklite-vl, openvlthinker (default: the checkpoint's replay_lens.json, else plain)",
    )
    parser.add_argument(
        "--system", default=None, metavar="TEXT", help="system prompt replacing the preset's ('' for none)"
    )
    parser.add_argument(
        "--verifier",
        default="auto",
        help="answer checker: auto (organism items: organism; items with options: choice; else math), "
        "math (math-verify), choice, organism (default auto)",
    )


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max-new-tokens`` (default: the pair's) and ``--batch-size``."""
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="decode budget (default: the checkpoint's generation_config, 4 on the organism, else 2048)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="items per batched greedy decode (default 8; results do not depend on it)",
    )


def read_items(args: argparse.Namespace, organism_default: int) -> list[Any]:
    """``--data`` (its first ``--items`` items, all by default) or ``--items`` organism items
    (``organism_default`` by default), every image opened once.

    Raises:
        ConfigError: ``--items`` below 1 or a malformed ``--columns``.
        DatasetError / InputError: A malformed dataset or an unreadable image.
    """
    from lens.datasets import check_images

    check_at_least(args.items, "--items")
    if args.data is not None:
        samples = read_dataset(args.data, getattr(args, "columns", None))
        samples = samples[: args.items] if args.items else samples
    else:
        if getattr(args, "columns", None):
            raise ConfigError("--columns maps the columns of --data; give --data too")
        from lens import organism

        samples = organism.heldout(n=args.items or organism_default)
    check_images(samples)
    return samples


def check_scoring(samples: Sequence[Any], verifier: Any) -> None:
    """Refuse, before loading, an item the verifier cannot score (no answer, choice without options)."""
    from lens.scoring import check_scorable

    check_scorable(samples, verifier)


def read_dataset(path: str | Path, columns: str | None = None) -> list[Any]:
    """The samples of ``--data`` in any supported format (JSONL, VLMEvalKit TSV, Parquet, a
    ``datasets.save_to_disk`` folder), with ``--columns`` mapping field names to the file's columns.

    Raises:
        ConfigError: A malformed ``--columns``.
        DatasetError: A malformed dataset (the message names the file and row).
    """
    from lens.datasets import load_dataset, parse_columns

    return load_dataset(path, parse_columns(columns) if columns else None)


def where(sample: Any, data: str | Path | None) -> str:
    """``data.jsonl:12 (sample 'x')`` when the row can be found, else ``sample 'x'``."""
    label = f"sample {str(sample.id)!r}"
    if data is None:
        return label
    path = Path(data)
    path = path / "data.jsonl" if path.is_dir() else path
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                try:
                    if str(json.loads(line).get("id")) == str(sample.id):
                        return f"{path}:{lineno} ({label})"
                except (ValueError, AttributeError):
                    continue
    except (OSError, UnicodeDecodeError):
        pass
    return f"{label} of {path}"


def check_samples(
    samples: Sequence[Any],
    spec: PairSpec,
    data: str | Path | None = None,
    needs_image: str | None = None,
) -> None:
    """Refuse samples the pair or the method cannot take, before any weight is loaded.

    Args:
        samples: The dataset's items (images already opened once by :func:`lens.datasets.check_images`).
        spec: The pair, from :func:`inspect_pair`.
        data: The dataset file, for row numbers in messages.
        needs_image: When set, what needs an image (e.g. ``"--strategies replay"``): a text-only item
            is refused.

    Raises:
        InputError: An image for a text-only pair, a text-only item where an image is needed, or an
            image whose size the image processor refuses (e.g. aspect ratio above 200).
    """
    from lens.datasets import sample_images

    for sample in samples:
        images = sample_images(sample)
        if images and not spec.multimodal:
            raise InputError(f"{where(sample, data)} has an image, but {spec.adapter.name} takes no images")
        if getattr(sample, "video", None) is not None and not spec.multimodal:
            raise InputError(f"{where(sample, data)} has a video, but {spec.adapter.name} takes no videos")
        if needs_image and not images:
            raise InputError(f"{where(sample, data)} has no image, but {needs_image} acts on visual tokens")
        for image in images:
            problem = image_size_problem(image, spec.image_processor)
            if problem:
                raise InputError(f"{where(sample, data)}: {problem}")


def image_size_problem(image: Any, processor: Any) -> str | None:
    """Why ``processor`` would refuse ``image``'s size, or ``None``.

    Asks the processor itself (``get_number_of_image_patches``, the size rule it applies when
    resizing, e.g. Qwen2-VL's ``smart_resize``), so the rule is the installed transformers' own.
    """
    if processor is None or not hasattr(processor, "get_number_of_image_patches"):
        return None
    if isinstance(image, (str, Path, bytes, bytearray, memoryview)):
        from io import BytesIO

        from PIL import Image

        encoded = not isinstance(image, (str, Path))
        with Image.open(BytesIO(image) if encoded else image) as img:  # the header only: no decoding
            width, height = img.size
        name = "the image" if encoded else Path(image).name
    else:
        width, height = image.size
        name = "the image"
    try:
        processor.get_number_of_image_patches(height, width, {})
    except (ValueError, ZeroDivisionError) as exc:
        return f"{name} is {width}x{height} px, which the image processor refuses: {exc}"
    return None


def load_pair_from_args(args: argparse.Namespace, device: str | None = None) -> Any:
    """Load the pair named by the arguments (after :func:`check_run_options` and :func:`inspect_pair`).

    Args:
        args: The parsed options.
        device: Overrides ``--device`` (a launched rank's own GPU).
    """
    from lens.loading import load_pair

    apply_threads(args)
    if args.base != "organism" and args.rlvr is None:
        raise ConfigError("--rlvr is required when --base is a checkpoint folder")
    return load_pair(
        args.base,
        args.rlvr,
        dtype=args.dtype,
        device=device or args.device,
        device_map=getattr(args, "device_map", None),
    )


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

    twins = list(args.rlvr or [])
    models = getattr(args, "models", None)
    if models is None and len(twins) <= 1:
        args.rlvr = twins[0] if twins else None
        return None
    if models is not None:
        if twins or args.base != "organism":
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
    elif args.base == "organism":
        sources, shape, organism_run = organism_sources(twins), "twins", True
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
    return load_models(
        models.sources,
        models.shape,
        dtype=args.dtype,
        device=device or args.device,
        device_map=getattr(args, "device_map", None),
        image_first=image_first,
    )


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
    """Stack each table of every comparison with ``comparison``/``reference``/``twin`` columns into
    ``OUT/<name>.csv``."""
    import pandas as pd

    from lens.modelset import label
    from lens.records import write_tables

    stacked = {}
    for name, by_comparison in tables.items():
        frames = []
        for (reference, other), frame in by_comparison.items():
            frame = frame.copy()
            frame.insert(0, "twin", other)
            frame.insert(0, "reference", reference)
            frame.insert(0, "comparison", label((reference, other)))
            frames.append(frame)
        stacked[name] = pd.concat(frames, ignore_index=True)
    write_tables(out, stacked)
