"""Calibration items for PTI's steering directions, drawn by the organism.

PTI (arXiv 2604.25642) contrasts, per calibration image, an *object-only* version (the image times
the union of its object masks) with a *background-only* one (the image times the complement), and a
prompt naming the objects with a caption whose object words were removed. The organism knows where
its shapes are: every pixel that differs from the uniform background belongs to a shape, so both
images are exact (no segmentation model needed), and the object words are the shapes' colours and
kinds.

Items come from their own seed, distinct from the held-out, validation and training streams, so
directions are never calibrated on evaluation items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from lens.errors import ConfigError
from lens.organism.task import BACKGROUND, COLOURS, KINDS, make_sample

#: Seed of the calibration stream (not :data:`~lens.organism.task.SPLITS`' nor a training seed).
CALIBRATION_SEED = 4242
#: Words that name objects in the organism's captions (removed from the negative text).
OBJECT_WORDS = frozenset((*COLOURS, *KINDS))


@dataclass(frozen=True)
class CalibrationItem:
    """One contrast pair for PTI's directions (any family; the organism draws its own).

    Attributes:
        image: The original image (used with the two texts).
        object_image: Objects kept, everything else black.
        background_image: Background kept, the objects black.
        question: The prompt shown with the object-only and background-only images.
        positive_text: A prompt naming the objects (PTI: the object list, ``"cat, dog."``).
        negative_text: The caption with its object words removed.
    """

    image: Image.Image
    object_image: Image.Image
    background_image: Image.Image
    question: str
    positive_text: str
    negative_text: str


def split_image(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Object-only and background-only versions of an organism image (mask: pixel != background)."""
    pixels = np.asarray(image.convert("RGB"))
    mask = np.any(pixels != np.asarray(BACKGROUND, dtype=pixels.dtype), axis=-1, keepdims=True)
    objects = np.where(mask, pixels, 0).astype(np.uint8)
    background = np.where(mask, 0, pixels).astype(np.uint8)
    return Image.fromarray(objects), Image.fromarray(background)


def calibration_items(n: int = 32, seed: int = CALIBRATION_SEED) -> list[CalibrationItem]:
    """``n`` calibration items of the organism's task (a pure function of ``seed``).

    The caption lists every shape (``"there are 2 shapes : a red round shape , a blue square
    shape ."``); the positive text is the object list (``"red round , blue square ."``) and the
    negative text the caption without colour and kind words.
    """
    if n < 2:
        raise ConfigError(f"PTI needs at least 2 calibration items (a principal component), got {n}")
    items = []
    for index in range(n):
        sample = make_sample(seed, index, "calibration")
        shapes = _shapes(seed, index)
        objects = [f"{colour} {kind}" for colour, kind in shapes]
        caption = f"there are {len(shapes)} shapes : " + " , ".join(f"a {o} shape" for o in objects) + " ."
        negative = " ".join(w for w in caption.split() if w not in OBJECT_WORDS)
        obj, bg = split_image(sample.image)
        items.append(
            CalibrationItem(sample.image, obj, bg, sample.question, " , ".join(objects) + " .", negative)
        )
    return items


def _shapes(seed: int, index: int) -> list[tuple[str, str]]:
    # The same draws as make_sample, in the same order (a pure function of seed and index).
    from lens.organism.task import GRID

    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, 10))
    rng.choice(GRID * GRID, size=n, replace=False)
    colours = list(COLOURS)
    out = []
    for _ in range(n):
        colour = colours[int(rng.integers(len(colours)))]
        out.append((colour, KINDS[int(rng.integers(len(KINDS)))]))
    return out
