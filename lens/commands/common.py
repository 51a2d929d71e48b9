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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens.errors import ConfigError, InputError

#: Device types a pair can be loaded onto, with the torch module that says whether one is present.
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def add_pair_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """``--base``/``--rlvr``/``--dtype``/``--device``/``--threads`` (and, with ``several``, repeated
    ``--rlvr`` twins and ``--models`` stages)."""
    parser.add_argument(
        "--base",
        default="organism",
        help="base checkpoint folder, or 'organism' (default; 'organism-tied': the readable variant)",
    )
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
        "--processor",
        default=None,
        choices=["rlvr", "base"],
        help="feed both models through this checkpoint's image processor when the two differ "
        "(default: refuse a pair whose processors differ)",
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
    from lens import organism
    from lens.loading import _resolve

    if args.base in organism.VARIANTS:
        return str(organism.model_dir("base", args.base)), organism.twin_source(args.rlvr or "rlvr", args.base)
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
    # The processor the models will be fed through (--processor base picks the base checkpoint's).
    side = 0 if getattr(args, "processor", None) == "base" else 1
    processor = _load_image_processor(sources[side]) if adapter.multimodal else None
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
    add_video_arguments(parser)


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """``--nframes``/``--fps``/``--max-pixels``/``--min-pixels``: the run's defaults for video items
    (an item's own options win; Video-R1 evaluates with ``--nframes 16 --max-pixels 200704``)."""
    group = parser.add_argument_group("video items")
    group.add_argument("--nframes", type=int, default=None, help="frames sampled per video (even, >= 2)")
    group.add_argument("--fps", type=float, default=None, help="frames per second sampled (default 2)")
    group.add_argument("--max-pixels", type=int, default=None, help="pixel budget per frame")
    group.add_argument("--min-pixels", type=int, default=None, help="lower pixel bound per frame")


def video_options(args: argparse.Namespace) -> Any:
    """The run's :class:`lens.video.VideoOptions` from the video flags, or ``None`` when none is given.

    Raises:
        ConfigError: Invalid values (``--nframes 1``, ``--nframes`` with ``--fps``, ...).
    """
    from lens.video import VideoOptions

    values = {name: getattr(args, name, None) for name in ("nframes", "fps", "max_pixels", "min_pixels")}
    if all(v is None for v in values.values()):
        return None
    try:
        return VideoOptions(**values)
    except InputError as exc:
        message = str(exc)
        for name in values:
            message = message.replace(f"'{name}'", f"--{name.replace('_', '-')}")
        raise ConfigError(message) from None


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

        variant = args.base if args.base in organism.VARIANTS else "organism"
        samples = organism.heldout_of(variant, n=args.items or organism_default)
    check_images(samples, video_options(args))
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
        if needs_image and not images and getattr(sample, "video", None) is None:
            raise InputError(
                f"{where(sample, data)} has no image or video, but {needs_image} acts on visual tokens"
            )
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
    from lens.organism import VARIANTS

    if args.base not in VARIANTS and args.rlvr is None:
        raise ConfigError("--rlvr is required when --base is a checkpoint folder")
    pair = load_pair(
        args.base,
        args.rlvr,
        dtype=args.dtype,
        device=device or args.device,
        device_map=getattr(args, "device_map", None),
        processor=getattr(args, "processor", None),
    )
    options = video_options(args)
    if options is not None:
        pair.video_options = options
    return pair
