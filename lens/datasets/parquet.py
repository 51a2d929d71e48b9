"""Parquet files and ``datasets.save_to_disk`` folders (read with pyarrow; ``datasets`` is not needed).

Image cells may be encoded bytes, a path (relative to the file; to the folder for ``save_to_disk``),
a ``{"bytes", "path"}`` struct (the Hugging Face ``Image`` feature), or a list of those for several
images. Options may be an ``options`` list/mapping column or columns ``A``..``Z``; an empty options
list is an open question (list columns hold ``[]`` there). Rows are numbered from 0 within each file,
as ``pyarrow`` and ``datasets`` index them.

A ``save_to_disk`` folder is Arrow IPC stream files listed in ``state.json`` (``_data_files``), with
the dataset's ``select``/``shuffle`` indices already applied by ``save_to_disk``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from lens.datasets.fields import RowBuilder, finish
from lens.datasets.images import check_image_bytes, resolve_image_path
from lens.datasets.sample import ImageRef, Sample
from lens.errors import DatasetError

# Rows converted to Python at a time: bounds the Arrow-and-Python copies of the images held at once.
BATCH_ROWS = 256


def load_parquet(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Sample]:
    """Read a ``.parquet`` file, or every ``*.parquet`` file of a folder in name order.

    Raises:
        DatasetError: Naming the file and 0-based row: an unreadable file, a mapped or required
            column that is missing, an image cell that cannot be decoded or whose file is missing,
            missing or duplicate ids, no rows.
        ConfigError: A mapping that names an unknown field.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DatasetError(f"no *.parquet files in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise DatasetError(f"dataset not found: {path}")
    return _load_tables(((f, *_parquet_batches(f), f.parent) for f in files), columns, str(path))


def load_saved_dataset(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Sample]:
    """Read a folder written by ``datasets.Dataset.save_to_disk``.

    Raises:
        DatasetError: A ``DatasetDict`` folder (naming its split folders), a missing or malformed
            ``state.json``, an unreadable Arrow file, or any row error of :func:`load_parquet`.
    """
    folder = Path(path)
    if (folder / "dataset_dict.json").is_file():
        splits = _json(folder / "dataset_dict.json").get("splits", [])
        shown = ", ".join(str(folder / s) for s in splits) or "none listed"
        raise DatasetError(f"{folder} holds several splits (a DatasetDict); pass one split folder: {shown}")
    state = _json(folder / "state.json")
    files = state.get("_data_files")
    if (
        not isinstance(files, list)
        or not files
        or not all(isinstance(f, dict) and "filename" in f for f in files)
    ):
        raise DatasetError(f"{folder / 'state.json'}: no '_data_files' list of Arrow files")
    split = state.get("_split")
    tables = ((folder / f["filename"], *_arrow_batches(folder / f["filename"]), folder) for f in files)
    samples = _load_tables(tables, columns, str(folder))
    if isinstance(split, str) and split:
        samples = [s if s.split is not None else replace(s, split=split) for s in samples]
    return samples


def _load_tables(
    tables: Iterable[tuple[Path, list[str], Iterator[Any], Path]],
    columns: Mapping[str, str] | None,
    source: str,
) -> list[Sample]:
    """Samples from ``(file, column names, record batches, folder for relative paths)`` per file."""
    builder = RowBuilder(columns)
    samples: list[Sample] = []
    places: list[str] = []
    for file, header, batches, base in tables:
        builder.check_header(header, str(file))
        image_column, path_column = builder.image_columns(header)
        i = 0
        for batch in batches:  # batch by batch, so Arrow and Python never both hold every image
            try:
                rows = batch.to_pylist()
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"{file}: text that is not valid UTF-8 near row {i} ({exc.reason})"
                ) from exc
            for row in rows:
                where = f"{file} row {i} (0-based)"
                images: tuple[ImageRef, ...] = ()
                if image_column is not None:
                    images = _images(row[image_column], image_column, base, where)
                if not images and path_column is not None:
                    images = _images(row[path_column], path_column, base, where)
                samples.append(builder.build(row, images, where))
                places.append(where)
                i += 1
    return finish(samples, places, source)


def _images(value: Any, column: str, base: Path, where: str) -> tuple[ImageRef, ...]:
    """Images of one cell: bytes, a path, a ``{"bytes", "path"}`` struct, or a list of those."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[ImageRef] = []
    for k, item in enumerate(items, start=1):
        label = f"{where}: {column!r} image {k} of {len(items)}" if len(items) > 1 else f"{where}: {column!r}"
        out.append(_image(item, base, label))
    return tuple(out)


def _image(item: Any, base: Path, where: str) -> ImageRef:
    if isinstance(item, Mapping) and ("bytes" in item or "path" in item):
        # The Hugging Face Image feature: embedded bytes win; a path alone points to a file.
        if item.get("bytes"):
            return check_image_bytes(bytes(item["bytes"]), where)
        if item.get("path"):
            return resolve_image_path(str(item["path"]), base, where)
        raise DatasetError(f"{where}: image struct has neither bytes nor a path")
    if isinstance(item, (bytes, bytearray)):
        return check_image_bytes(bytes(item), where)
    if isinstance(item, str) and item:
        return resolve_image_path(item, base, where)
    raise DatasetError(
        f"{where}: cannot read an image from a {type(item).__name__} cell "
        f"(expected bytes, a path or a {{'bytes', 'path'}} struct)"
    )


def _parquet_batches(file: Path) -> tuple[list[str], Iterator[Any]]:
    """A Parquet file's column names and its record batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{file}: cannot read as Parquet ({exc})") from exc
    return list(reader.schema_arrow.names), _guarded(
        reader.iter_batches(batch_size=BATCH_ROWS), file, "Parquet"
    )


def _arrow_batches(file: Path) -> tuple[list[str], Iterator[Any]]:
    """An Arrow IPC file's column names and record batches (stream format, as save_to_disk writes)."""
    import pyarrow as pa

    if not file.is_file():
        raise DatasetError(f"Arrow file listed in state.json not found: {file}")
    source = pa.OSFile(str(file))
    try:
        try:
            reader = pa.ipc.open_stream(source)
            batches: Iterator[Any] = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(k) for k in range(reader.num_record_batches))
    except (pa.ArrowException, OSError) as exc:
        source.close()
        raise DatasetError(f"{file}: cannot read as an Arrow file ({exc})") from exc
    return list(reader.schema.names), _guarded(batches, file, "an Arrow file", close=source)


def _guarded(batches: Iterator[Any], file: Path, kind: str, close: Any = None) -> Iterator[Any]:
    """Record batches, with Arrow's read errors turned into one-line DatasetErrors."""
    import pyarrow as pa

    try:
        yield from batches
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{file}: cannot read as {kind} ({exc})") from exc
    finally:
        if close is not None:
            close.close()


def _json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetError(f"{file.parent}: not a save_to_disk folder (no {file.name})") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{file}: cannot read ({exc})") from exc
    if not isinstance(value, dict):
        raise DatasetError(f"{file}: expected a JSON object")
    return value
