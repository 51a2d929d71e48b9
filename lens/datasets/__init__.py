"""Benchmark datasets: one reader per file format, all yielding the same :class:`Sample`.

========================================  ===========================================
``path``                                  reader
========================================  ===========================================
``*.jsonl`` file, or folder + data.jsonl  :func:`load_jsonl` (images: paths)
``*.tsv`` file                            :func:`load_tsv` (VLMEvalKit; base64 images)
``*.parquet`` file, or folder of them     :func:`load_parquet`
``datasets.save_to_disk`` folder          :func:`load_saved_dataset`
========================================  ===========================================

``columns`` maps :class:`Sample` fields to the file's column names, for every reader
(``{"question": "query", "answer": "gt", "image": "decoded_image"}``; :func:`parse_columns` reads
the CLI form). Errors are :class:`~lens.errors.DatasetError` naming the file and row: 1-based lines
for JSONL and TSV, 0-based rows within each file for Parquet and Arrow.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lens.datasets.fields import FIELDS, check_mapping, parse_columns
from lens.datasets.images import check_images
from lens.datasets.jsonl import load_jsonl
from lens.datasets.parquet import load_parquet, load_saved_dataset
from lens.datasets.sample import ImageRef, Sample, sample_images
from lens.datasets.tsv import load_tsv
from lens.errors import DatasetError

__all__ = [
    "FIELDS",
    "ImageRef",
    "Sample",
    "check_images",
    "dataset_format",
    "load_dataset",
    "load_jsonl",
    "load_parquet",
    "load_saved_dataset",
    "load_tsv",
    "parse_columns",
    "sample_images",
]

_READERS = {
    "jsonl": load_jsonl,
    "tsv": load_tsv,
    "parquet": load_parquet,
    "save_to_disk": load_saved_dataset,
}
_SUFFIXES = {".jsonl": "jsonl", ".tsv": "tsv", ".parquet": "parquet"}
_EXPECTED = (
    "expected a .jsonl, .tsv or .parquet file, or a folder holding data.jsonl, "
    "a datasets.save_to_disk dataset (state.json) or *.parquet files"
)


def dataset_format(path: str | Path) -> str:
    """Which reader a path needs: ``jsonl``, ``tsv``, ``parquet`` or ``save_to_disk``.

    Raises:
        DatasetError: The path does not exist, or its format is none of those.
    """
    path = Path(path)
    if path.is_file():
        kind = _SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DatasetError(
                f"unknown dataset format {path.suffix or '(no suffix)'!r} for {path}; {_EXPECTED}"
            )
        return kind
    if path.is_dir():
        if (path / "data.jsonl").is_file():
            return "jsonl"
        if any((path / name).is_file() for name in ("state.json", "dataset_info.json", "dataset_dict.json")):
            return "save_to_disk"
        if any(path.glob("*.parquet")):
            return "parquet"
        raise DatasetError(f"no dataset found in folder {path}; {_EXPECTED}")
    raise DatasetError(f"dataset not found: {path}")


def load_dataset(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Sample]:
    """Read a dataset in any supported format, picking the reader from the path.

    Args:
        path: A file or folder (see the module docstring).
        columns: ``{field: column}``, for files whose columns have other names.

    Raises:
        DatasetError: An unknown format, or any error of the chosen reader (file and row named).
        ConfigError: A mapping that names an unknown field.
    """
    columns = check_mapping(columns)
    return _READERS[dataset_format(path)](path, columns)
