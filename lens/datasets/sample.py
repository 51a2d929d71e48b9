"""The one item type every dataset reader yields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens.video import VideoOptions, VideoPart

ImageRef = Path | bytes
"""An image as a reader leaves it: an absolute file path, or the encoded file (PNG, JPEG, ...)."""


@dataclass(frozen=True)
class Sample:
    """One dataset item, whatever file it came from.

    Attributes:
        id: Unique within the dataset.
        question: The question text (without options or hint: the prompt preset lays those out).
        images: Zero or more images, in prompt order: absolute paths or encoded image bytes.
        answer: The gold answer, as text (a choice letter for multiple-choice items).
        response: A response to teacher-force after the prompt.
        options: Ordered ``(letter, text)`` pairs of a multiple-choice item,
            e.g. ``(("A", "3"), ("B", "5"))``.
        hint: Context shown before the question (VLMEvalKit's ``hint`` column).
        qtype: Category or question type (VLMEvalKit's ``category``).
        split: The split the item belongs to, when the file says.
        meta: Every other column of the row, kept for the records.
        video: A video file (absolute path), for video items.
        video_options: The item's own video options (``nframes`` or ``fps``, ``max_pixels``,
            ``min_pixels``); unset ones take the run's (``ModelPair.video_options``).
    """

    id: str
    question: str
    images: tuple[ImageRef, ...] = ()
    answer: str | None = None
    response: str | None = None
    options: tuple[tuple[str, str], ...] = ()
    hint: str | None = None
    qtype: str | None = None
    split: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    video: Path | None = None
    video_options: VideoOptions | None = None

    @property
    def image(self) -> ImageRef | None:
        """The first image, or ``None`` for a text-only item (for single-image code)."""
        return self.images[0] if self.images else None


def sample_images(sample: Any) -> tuple[Any, ...]:
    """All images of a sample: ``sample.images`` when it has them, else its single ``image`` (if any).

    Accepts a :class:`Sample` as well as single-image items such as the organism's, whose ``image``
    is a PIL image.
    """
    images = getattr(sample, "images", None)
    if images is not None:
        return tuple(images)
    image = getattr(sample, "image", None)
    return () if image is None else (image,)


def sample_videos(sample: Any) -> tuple[VideoPart, ...]:
    """A sample's video as message parts (empty without one); works for any object with ``video``."""
    video = getattr(sample, "video", None)
    if video is None:
        return ()
    return (VideoPart(video, getattr(sample, "video_options", None)),)
