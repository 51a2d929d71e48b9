"""JSONL datasets: one JSON object per line.

Fields: ``id`` and ``question`` (required); ``image`` (one path) or ``images`` (a list of paths),
relative to the JSONL file, absent for text-only items; optional ``answer``, ``response``, ``hint``,
``qtype`` (or ``category``), ``split``, and ``options``: a list of option texts (lettered A, B, ...)
or a ``{"A": text, ...}`` mapping, or keys ``A``..``Z`` as in a VLMEvalKit row. Writing
``"options": {}`` (or ``[]``) declares a multiple-choice item without options, which is refused.
Every other key goes to :attr:`Sample.meta`. Lines are numbered from 1 in messages.

Video items: ``video`` (a path relative to the file) with optional ``nframes`` or ``fps``,
``max_pixels`` and ``min_pixels`` (see :class:`lens.video.VideoOptions`). The video's header and
packets are read here (no frame decoded), so a missing, unreadable or empty video, or more frames
asked than it has, fails with its file:line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from lens.datasets.fields import RowBuilder, finish
from lens.datasets.images import resolve_image_path
from lens.datasets.sample import Sample
from lens.errors import DatasetError, InputError
from lens.video import VideoOptions, probe_video, sample_indices

_VIDEO_KEYS = ("video", "nframes", "fps", "max_pixels", "min_pixels")


def load_jsonl(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Sample]:
    """Read and validate a JSONL dataset (a ``.jsonl`` file, or a folder holding ``data.jsonl``).

    Args:
        path: The file or folder.
        columns: ``{field: key}`` for files whose keys have other names, e.g. ``{"question": "query"}``.

    Raises:
        DatasetError: Missing file, a line that is not UTF-8 or not a JSON object (with its line
            number), a missing field, missing or duplicate ids, a missing image file, a mapped key
            that no line has, or no samples at all.
        ConfigError: A mapping that names an unknown field.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "data.jsonl"
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path}")
    builder = RowBuilder(columns, empty_options_error=True)
    samples: list[Sample] = []
    places: list[str] = []
    seen_keys: dict[str, None] = {}
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: malformed JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DatasetError(f"{where}: expected a JSON object")
            seen_keys.update(dict.fromkeys(obj))
            images = _images(obj, builder, path.parent, where)
            video = _video(obj, path.parent, where)
            sample = builder.build(obj, images, where)
            if video is not None:
                sample = replace(sample, video=video[0], video_options=video[1], meta=video[2](sample.meta))
            samples.append(sample)
            places.append(where)
    for field_name, key in builder.columns.mapping.items():
        if key not in seen_keys and samples:
            raise DatasetError(
                f"{path}: key {key!r} (mapped to {field_name!r}) is in no line; keys: {', '.join(seen_keys)}"
            )
    return finish(samples, places, str(path))


def _images(obj: dict[str, Any], builder: RowBuilder, base: Path, where: str) -> tuple[Path, ...]:
    if not builder.columns.mapping.get("image") and "image" in obj and "images" in obj:
        raise DatasetError(f"{where}: give 'image' or 'images', not both")
    image_key, path_key = builder.image_columns(obj.keys())
    for key in (image_key, path_key):
        if key is None or obj[key] in (None, "", []):
            continue
        value = obj[key]
        paths = value if isinstance(value, list) else [value]
        if not all(isinstance(p, str) and p for p in paths):
            raise DatasetError(f"{where}: {key!r} must be a path or a list of paths (relative to the file)")
        return tuple(resolve_image_path(p, base, where) for p in paths)
    return ()


def _video(
    obj: dict[str, Any], base: Path, where: str
) -> tuple[Path, VideoOptions | None, Callable[[Mapping[str, Any]], dict[str, Any]]] | None:
    """The row's video, its options, and a filter that keeps the video keys out of ``meta``."""
    if obj.get("video") in (None, ""):
        stray = [k for k in _VIDEO_KEYS[1:] if k in obj]
        if stray:
            raise DatasetError(f"{where}: {', '.join(map(repr, stray))} given without a 'video'")
        return None
    value = obj["video"]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: 'video' must be a path (relative to the file)")
    video = Path(value).expanduser()
    video = (video if video.is_absolute() else base / video).resolve()
    given = {k: obj[k] for k in _VIDEO_KEYS[1:] if obj.get(k) is not None}
    try:
        options = VideoOptions(**given) if given else None
        info = probe_video(video)
        opts = options or VideoOptions()
        sample_indices(info.total_frames, info.fps, opts)
    except InputError as exc:
        raise DatasetError(f"{where}: {exc}") from exc

    def strip(meta: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in meta.items() if k not in _VIDEO_KEYS}

    return video, options, strip
