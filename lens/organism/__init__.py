"""The built-in model organism: a tiny base / RLVR / control Qwen2.5-VL trio trained offline.

The three models ship as safetensors under ``lens/organism/weights/{base,rlvr,control}`` and share a
word-level tokenizer, a chat template and a ``Qwen2VLImageProcessorPil`` (no torchvision needed). The task
(counting coloured shapes) and its splits are regenerated from their seeds on demand.

Example:
    >>> from lens import organism
    >>> pair = organism.load_pair()                  # base vs rlvr through lens.load_pair
    >>> model, tok, ip = organism.load_model("rlvr")  # one model, plain transformers
    >>> items = organism.heldout(500)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lens.errors import CheckpointError, ConfigError
from lens.organism.task import (
    QTYPES,
    Sample,
    heldout,
    validation,
    verify,
    write_dataset,
)

KNOWN_PAIRS = ("rlvr", "control")
"""Names of the twins compared against the base (the base is always ``"base"``)."""
MODEL_NAMES = ("base", *KNOWN_PAIRS)
IMAGE_FIRST = False
"""The organism's prompts put the question before the image (see the feasibility study)."""
VARIANTS = {"organism": "weights", "organism-tied": "weights_tied", "organism-video": "weights_video"}
"""Pair names of the shipped trios and their folders: the default organism, the opt-in readable one
(tied embeddings and a caption stage before SFT; see the README, "τ·max on a readable organism") and
the video organism (:mod:`lens.organism.video`, whose items are 4-frame clips)."""

__all__ = [
    "IMAGE_FIRST",
    "KNOWN_PAIRS",
    "MODEL_NAMES",
    "QTYPES",
    "VARIANTS",
    "Sample",
    "heldout",
    "load_model",
    "load_pair",
    "heldout_of",
    "manifest",
    "model_dir",
    "validation",
    "verify",
    "weights_dir",
    "write_dataset",
]


def weights_dir(variant: str = "organism") -> Path:
    """Folder holding a shipped trio (``base/``, ``rlvr/``, ``control/``, ``manifest.json``).

    Args:
        variant: A key of :data:`VARIANTS` (``"organism"``, the default trio, or ``"organism-tied"``).

    Raises:
        ConfigError: An unknown variant.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown organism {variant!r}; known: {', '.join(VARIANTS)}")
    return Path(__file__).resolve().parent / VARIANTS[variant]


def model_dir(name: str, variant: str = "organism") -> Path:
    """Folder of one shipped model.

    Raises:
        ConfigError: For a name other than ``base``, ``rlvr`` or ``control``, or an unknown variant.
        CheckpointError: If the weights are missing from the installation.
    """
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown organism model {name!r}; known: {', '.join(MODEL_NAMES)}")
    path = weights_dir(variant) / name
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(
            f"organism weights missing at {path}; run `lens organism train --out {weights_dir(variant)}`"
        )
    return path


def manifest(variant: str = "organism") -> dict[str, Any]:
    """The shipped ``manifest.json`` (seed, steps, held-out greedy accuracy of each model)."""
    path = weights_dir(variant) / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"organism manifest missing at {path}")
    return json.loads(path.read_text())


def load_pair(rlvr: str = "rlvr", variant: str = "organism", **kw: Any):
    """Load ``base`` and a twin (``rlvr`` or ``control``) through :func:`lens.load_pair`.

    Args:
        rlvr: Twin name, one of :data:`KNOWN_PAIRS`, or a checkpoint folder derived from the organism's
            base (e.g. a planted checkpoint, :mod:`lens.planted_checkpoint`), read with the
            organism's prompt layout.
        variant: Which shipped trio, a key of :data:`VARIANTS`.
        **kw: Passed to :func:`lens.load_pair` (``dtype``, ``device``...). ``image_first`` defaults to
            ``False`` because the organism was trained with the question before the image.
    """
    import lens

    kw = {k: v for k, v in kw.items() if v is not None}
    kw.setdefault("image_first", IMAGE_FIRST)
    return lens.load_pair(str(model_dir("base", variant)), twin_source(rlvr, variant), **kw)


def twin_source(rlvr: str, variant: str = "organism") -> str:
    """The folder of an organism twin: a name of :data:`KNOWN_PAIRS` or a checkpoint folder.

    Raises:
        ConfigError: Neither a known twin nor an existing folder.
    """
    if rlvr in KNOWN_PAIRS:
        return str(model_dir(rlvr, variant))
    if Path(rlvr).is_dir():
        return str(Path(rlvr))
    raise ConfigError(
        f"unknown organism twin {rlvr!r}; known: {', '.join(KNOWN_PAIRS)}, or a checkpoint folder"
    )


def load_model(name: str, variant: str = "organism"):
    """Load one shipped model directly with transformers.

    Returns:
        ``(model, tokenizer, image_processor)`` on CPU in fp32, eval mode.
    """
    from lens.organism.model import load_folder

    return load_folder(model_dir(name, variant))


def heldout_of(variant: str, n: int = 500) -> list[Any]:
    """The held-out items of a shipped trio: the video organism's clips, or the image task's items.

    Raises:
        ConfigError: An unknown variant.
    """
    weights_dir(variant)  # refuses an unknown name
    if variant == "organism-video":
        from lens.organism import video

        return video.heldout(n)
    return heldout(n)


def encoder_of(variant: str, tokenizer: Any) -> Any:
    """The batched training/evaluation encoder of a shipped trio (video clips or images)."""
    if variant == "organism-video":
        from lens.organism.video import VideoEncoder

        return VideoEncoder(tokenizer)
    from lens.organism.model import Encoder

    return Encoder(tokenizer)
