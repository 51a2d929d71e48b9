"""Image cells: cheap checks at load time, and the full decode of :func:`check_images`.

Readers keep images as they find them (a path, or the encoded bytes), so loading a 1 GB TSV does not
decode every picture. At load time an encoded image only has its header parsed and its structure
checked (``PIL.Image.verify``: chunk checksums for PNG, no pixel decoding), which catches cells that
are not images at all or are cut short. :func:`check_images` decodes everything, before a run writes
anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image

from lens.datasets.sample import sample_images
from lens.errors import DatasetError, InputError


def check_image_bytes(data: bytes, where: str) -> bytes:
    """Return ``data`` if it looks like a complete image file (header and structure only).

    Raises:
        DatasetError: Naming ``where``, when PIL cannot identify or verify the image.
    """
    if not data:
        raise DatasetError(f"{where}: empty image")
    try:
        with Image.open(BytesIO(data)) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise DatasetError(f"{where}: image cannot be decoded ({type(exc).__name__}: {exc})") from exc
    return data


def resolve_image_path(value: str, base: Path, where: str) -> Path:
    """An image path as written in a dataset (relative to ``base``) made absolute; it must exist.

    Raises:
        DatasetError: The file does not exist.
    """
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not path.is_file():
        raise DatasetError(f"{where}: image not found: {path}")
    return path


def check_images(samples: Iterable[Any], video_defaults: Any = None) -> None:
    """Decode every image of every sample (paths and bytes), so a corrupt one fails before any output.

    In-memory PIL images and video clips (the organisms') are already decoded and are skipped. A sample's video
    is probed (every packet read, no frame decoded) and its frame count checked against its options.

    Args:
        samples: The dataset's items.
        video_defaults: The run's :class:`lens.video.VideoOptions` (``--nframes`` ...), which fill the
            options an item leaves unset.

    Raises:
        InputError: A missing, unreadable or corrupt image, or a missing, unreadable or empty video
            (the message names the sample and image or video).
    """
    from lens.inputs import open_image
    from lens.video import VideoClip, VideoOptions, probe_video, sample_indices

    for sample in samples:
        video = getattr(sample, "video", None)
        if video is not None and not isinstance(video, VideoClip):  # an in-memory clip is decoded
            try:
                info = probe_video(video)
                options = (getattr(sample, "video_options", None) or VideoOptions()).over(video_defaults)
                sample_indices(info.total_frames, info.fps, options)
            except InputError as exc:
                raise InputError(f"sample {sample.id!r}: {exc}") from exc
        images = sample_images(sample)
        for k, image in enumerate(images):
            if isinstance(image, Image.Image):
                continue
            try:
                open_image(image)
            except InputError as exc:
                which = f" image {k + 1} of {len(images)}" if len(images) > 1 else ""
                raise InputError(f"sample {sample.id!r}{which}: {exc}") from exc
