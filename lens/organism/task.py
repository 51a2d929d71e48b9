"""The organism's verifiable visual task: count coloured shapes in a 64x64 image.

Each image has 1-9 shapes placed in distinct cells of a 4x4 grid of 16-px cells (one cell = one merged
vision token of the organism). A shape is red, green, blue or yellow, and round or square. The question
asks for the number of ``red`` shapes, ``round`` shapes or ``total`` shapes; the answer is an integer and
the reward is :func:`verify` on the decoded response.

Every item is a pure function of ``(seed, index)``, so a split is reproducible from its seed alone and
``heldout(100)`` is a prefix of ``heldout(500)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lens.errors import ConfigError

IMAGE_SIZE = 64
CELL = 16
GRID = IMAGE_SIZE // CELL
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 215, 40),
}
KINDS = ("round", "square")
QTYPES = ("red", "round", "total")
"""Question types. The tokenizer knows all seven words (4 colours, 2 kinds, total); the study found the
seven-type task does not train within budget, so the organism asks three."""
BACKGROUND = (20, 20, 24)

HELDOUT_SEED = 12345
VALIDATION_SEED = 777
TRAIN_SEED_OFFSET = 100_000
"""Training items use seed ``TRAIN_SEED_OFFSET + run_seed``, which never equals the eval seeds."""

SPLITS = {"heldout": HELDOUT_SEED, "validation": VALIDATION_SEED}

_ANSWER_RE = re.compile(r"answer\s+(\d+)")


@dataclass(frozen=True)
class Shape:
    """One drawn shape: grid cell, colour and kind."""

    row: int
    col: int
    colour: str
    kind: str


@dataclass(frozen=True)
class Sample:
    """One task item (the same field names as the JSONL dataset records).

    Attributes:
        id: Stable identifier, ``"<split>-<index>"``.
        question: The question text, e.g. ``"how many red shapes ?"``.
        image: The 64x64 RGB image (``None`` for text-only records).
        answer: The ground-truth integer as a string (``None`` if unknown).
        response: A model response, if one was recorded.
        qtype: Question type, one of :data:`QTYPES`.
    """

    id: str
    question: str
    image: Image.Image | None
    answer: str | None
    response: str | None = None
    qtype: str = ""


def question_for(qtype: str) -> str:
    """Return the question text for a question type."""
    return f"how many {qtype} shapes ?"


def count(shapes: list[Shape], qtype: str) -> int:
    """Ground-truth answer for ``qtype`` over ``shapes``."""
    if qtype == "total":
        return len(shapes)
    if qtype in COLOURS:
        return sum(s.colour == qtype for s in shapes)
    if qtype in KINDS:
        return sum(s.kind == qtype for s in shapes)
    raise ConfigError(f"unknown question type {qtype!r}; known: {', '.join(QTYPES)}")


def render(shapes: list[Shape], rng: np.random.Generator) -> Image.Image:
    """Draw shapes with a random radius (4-6 px) and jitter that keeps each inside its cell."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        r = int(rng.integers(4, 7))
        # Centre jitter keeps the whole shape inside its 16-px cell (r <= 6 leaves >= 1 px margin).
        cx = s.col * CELL + int(rng.integers(r + 1, CELL - r))
        cy = s.row * CELL + int(rng.integers(r + 1, CELL - r))
        box = (cx - r, cy - r, cx + r - 1, cy + r - 1)
        if s.kind == "round":
            draw.ellipse(box, fill=COLOURS[s.colour])
        else:
            draw.rectangle(box, fill=COLOURS[s.colour])
    return img


def make_sample(seed: int, index: int, split: str = "item", qtype: str | None = None) -> Sample:
    """Generate item ``index`` of the stream with ``seed`` (a pure function of both).

    Args:
        seed: Stream seed.
        index: Item index within the stream.
        split: Name used in the item id.
        qtype: Force a question type; by default it is drawn uniformly.

    Returns:
        The sample, with ``answer`` set.
    """
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, 10))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    colours = list(COLOURS)
    shapes = [
        Shape(
            row=int(c) // GRID,
            col=int(c) % GRID,
            colour=colours[int(rng.integers(len(colours)))],
            kind=KINDS[int(rng.integers(len(KINDS)))],
        )
        for c in cells
    ]
    drawn_qtype = QTYPES[int(rng.integers(len(QTYPES)))]
    qtype = qtype or drawn_qtype
    image = render(shapes, rng)
    return Sample(
        id=f"{split}-{index:05d}",
        question=question_for(qtype),
        image=image,
        answer=str(count(shapes, qtype)),
        qtype=qtype,
    )


def generate(seed: int, n: int, split: str = "item", start: int = 0) -> list[Sample]:
    """Items ``start .. start+n-1`` of the stream with ``seed``."""
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    return [make_sample(seed, i, split) for i in range(start, start + n)]


def heldout(n: int = 500) -> list[Sample]:
    """The held-out test split (seed 12345); ``heldout(k)`` is a prefix of ``heldout(m)`` for k < m."""
    return generate(HELDOUT_SEED, n, "heldout")


def validation(n: int = 256) -> list[Sample]:
    """The validation split (seed 777), used for early stopping and RL monitoring only."""
    return generate(VALIDATION_SEED, n, "validation")


def split_samples(split: str, n: int) -> list[Sample]:
    """Samples of a named split (``heldout`` or ``validation``)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return generate(SPLITS[split], n, split)


def verify(text: str | None, answer: str | int | None) -> bool:
    """Verifiable reward: the first ``answer <digits>`` in ``text`` equals ``answer``.

    Extra text around the match is allowed. With two matches (``"answer 3 answer 4"``) only the first
    counts. No match, an empty response or a missing answer gives ``False``.
    """
    if not text or answer is None:
        return False
    m = _ANSWER_RE.search(text)
    if m is None:
        return False
    try:
        return int(m.group(1)) == int(answer)
    except ValueError:
        return False


def write_dataset(out_dir: str | os.PathLike, split: str = "heldout", n: int = 500) -> Path:
    """Write a split as a JSONL dataset folder: ``data.jsonl`` plus ``images/<id>.png``.

    Each line holds ``id``, ``question``, ``image`` (path relative to the folder), ``answer`` and ``qtype``.
    The folder is built in a temporary sibling and renamed into place, so an interrupted write never
    leaves a half-written dataset.

    Args:
        out_dir: Target folder; it must not exist or be empty.
        split: ``heldout`` or ``validation``.
        n: Number of items.

    Returns:
        The written folder.
    """
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} exists and is not empty")
    samples = split_samples(split, n)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w") as f:
            for s in samples:
                rel = f"images/{s.id}.png"
                s.image.save(tmp / rel)
                rec = {"id": s.id, "question": s.question, "image": rel, "answer": s.answer, "qtype": s.qtype}
                f.write(json.dumps(rec) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
