"""Local benchmark datasets: JSONL, one object per line.

Fields: ``id`` (required), ``question`` (required), ``image`` (a path relative to the JSONL file;
absent for text-only), and optional ``answer`` and ``response``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens.errors import DatasetError, InputError


@dataclass(frozen=True)
class Sample:
    """One dataset item. ``image`` is an absolute path (or ``None`` for text-only)."""

    id: str
    question: str
    image: Path | None = None
    answer: str | None = None
    response: str | None = None
    qtype: str | None = None

    @property
    def images(self) -> tuple[Path, ...]:
        return () if self.image is None else (self.image,)


def load_jsonl(path: str | Path) -> list[Sample]:
    """Read and validate a JSONL dataset.

    Raises:
        DatasetError: Missing file, malformed line (with its line number), missing or duplicate
            ids, a missing image file, or no samples at all.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "data.jsonl"
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path}")
    samples: list[Sample] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: malformed JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DatasetError(f"{where}: expected a JSON object")
            for key in ("id", "question"):
                if key not in obj:
                    raise DatasetError(f"{where}: missing required field {key!r}")
            if not isinstance(obj["question"], str) or not obj["question"].strip():
                raise DatasetError(f"{where}: 'question' must be a non-empty string")
            sample_id = str(obj["id"])
            if sample_id in seen:
                raise DatasetError(f"{where}: duplicate id {sample_id!r}")
            seen.add(sample_id)
            image = None
            if obj.get("image"):
                image = (path.parent / str(obj["image"])).resolve()
                if not image.is_file():
                    raise DatasetError(f"{where}: image not found: {image}")
            samples.append(
                Sample(
                    id=sample_id,
                    question=obj["question"],
                    image=image,
                    answer=None if obj.get("answer") is None else str(obj["answer"]),
                    response=obj.get("response"),
                    qtype=obj.get("qtype"),
                )
            )
    if not samples:
        raise DatasetError(f"dataset has no samples: {path}")
    return samples


def check_images(samples: Iterable[Any]) -> None:
    """Open every sample's image once, so a corrupt one fails before any output is written.

    Raises:
        InputError: A missing, unreadable or corrupt image (the message names the sample).
    """
    from lens.inputs import open_image

    for sample in samples:
        image = getattr(sample, "image", None)
        if image is None or not isinstance(image, (str, Path)):
            continue
        try:
            open_image(image)
        except InputError as exc:
            raise InputError(f"sample {sample.id!r}: {exc}") from exc
