"""VLMEvalKit TSV benchmarks (one tab-separated file per benchmark, images inline as base64).

The format, as VLMEvalKit reads it (``vlmeval/dataset/image_base.py``, ``ImageBaseDataset.__init__``
and ``dump_image``; ``vlmeval/smp`` ``toliststr`` and ``decode_base64_to_image``):

- ``index`` identifies the row; ``question``, ``hint``, ``answer``, ``category`` (our ``qtype``) and
  ``split`` are text; every other column goes to :attr:`Sample.meta`.
- ``image`` holds, per row, either the base64 of an image file, or (a cell of at most 64 characters)
  the ``index`` of another row whose own cell is the base64 to reuse, or a stringified Python list of
  base64 strings for a multi-image row (a cell that starts with ``[`` and ends with ``]``).
- ``image_path`` holds a path (or a stringified list of paths); we use it, relative to the TSV,
  when a row has no ``image`` cell.
- The options are the columns ``A``..``Z`` whose cell is not NA (``pd.isna`` in VLMEvalKit), in
  letter order (``ImageMCQDataset.build_prompt``); an NA ``hint`` is no hint. NA means what a default
  ``pd.read_csv`` reads as NaN: an empty cell, or one of :data:`PANDAS_NA` (``NA``, ``None``, ``nan``...).

Differences, on purpose: cells are kept as the text in the file (VLMEvalKit's ``pd.read_csv`` turns an
option column ``3``/empty into ``3.0``/NaN); a row with an empty ``image`` cell becomes a text-only
item instead of being dropped; rows are numbered by their first physical line (1 = the header).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from lens.datasets.fields import RowBuilder, finish
from lens.datasets.images import check_image_bytes, resolve_image_path
from lens.datasets.sample import ImageRef, Sample
from lens.errors import DatasetError

# pandas' default NA strings: VLMEvalKit reads TSVs with a default ``pd.read_csv``, then tests option
# and hint cells with ``pd.isna``, so a cell holding one of these is "no option"/"no hint" there.
PANDAS_NA = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)
# VLMEvalKit: an image cell of at most this many characters is the index of another row.
INDEX_REF_MAX_CHARS = 64


def load_tsv(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Sample]:
    """Read and validate a VLMEvalKit TSV; images stay encoded bytes (checked, not decoded).

    The file is streamed: each row's base64 is decoded as the row is read and the text dropped, so
    memory holds the image bytes once, not the file's text as well.

    Args:
        path: The ``.tsv`` file.
        columns: ``{field: column}`` for files whose columns have other names.

    Raises:
        DatasetError: Naming the file and line: not UTF-8, a row with the wrong number of cells, a
            mapped or required column that is missing, an image cell that is neither base64 nor a
            known index, an image that cannot be decoded, missing or duplicate ids, no rows.
        ConfigError: A mapping that names an unknown field.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path}")
    builder = RowBuilder(columns, na_strings=PANDAS_NA)
    table = _TsvRows(path)
    builder.check_header(table.header, str(path))
    id_column = builder.columns.column("id", table.header)
    image_column, path_column = builder.image_columns(table.header)

    samples: list[Sample] = []
    places: list[str] = []
    own_images: dict[str, tuple[bytes, ...]] = {}  # index -> the images its row holds itself
    references: list[tuple[int, str, str]] = []  # (sample position, referenced index, where)
    for lineno, row in table:
        where = f"{path}:{lineno}"
        found: tuple[ImageRef, ...] = ()
        cell = row[image_column] if image_column is not None else None
        if cell is not None and len(cell) <= INDEX_REF_MAX_CHARS:
            references.append((len(samples), cell, where))  # resolved once every row is read
        elif cell is not None:
            found = _decode_cell(cell, where)
            if row[id_column] is not None:
                own_images.setdefault(row[id_column], found)
        elif path_column is not None and row[path_column]:
            found = tuple(
                resolve_image_path(p, path.parent, where) for p in _list_cell(row[path_column], where)
            )
        samples.append(builder.build(row, found, where))
        places.append(where)
    for position, index, where in references:
        # VLMEvalKit: a short cell names the row holding the image, whose own cell must be base64.
        if index not in own_images:
            raise DatasetError(
                f"{where}: image cell {index!r} is neither base64 nor the index of a row with an image"
            )
        samples[position] = replace(samples[position], images=own_images[index])
    return finish(samples, places, str(path))


class _TsvRows:
    """A TSV read row by row: ``header``, then ``(first physical line, {column: cell or None})`` pairs.

    The header is read on construction, so a file without one fails before any row is processed.
    """

    def __init__(self, path: Path) -> None:
        # Base64 cells are far larger than the csv module's default 128 KiB field limit (a process-wide
        # setting; raising it only lets other readers accept longer fields too).
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        self.path = path
        self._rows = self._read()
        header = next(self._rows, None)
        if header is None:
            raise DatasetError(f"dataset has no samples: {path}")
        self.header: list[str] = header[1]

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self._rows

    def _read(self) -> Iterator[tuple[int, Any]]:
        path, header = self.path, None
        lineno = 1
        with open(path, encoding="utf-8-sig", newline="") as fh:
            try:
                for lineno, cells in records(fh):
                    if not cells:
                        continue
                    if header is None:
                        header = cells
                        duplicated = sorted({c for c in header if header.count(c) > 1})
                        if duplicated:
                            raise DatasetError(f"{path}:{lineno}: duplicate columns {', '.join(duplicated)}")
                        yield lineno, header
                    elif len(cells) != len(header):
                        raise DatasetError(
                            f"{path}:{lineno}: {len(cells)} cells, but the header has {len(header)} columns"
                        )
                    else:
                        yield (
                            lineno,
                            {c: (v if v != "" else None) for c, v in zip(header, cells, strict=True)},
                        )
            except UnicodeDecodeError as exc:
                # The text layer decodes ahead in blocks, so find the line in the raw bytes.
                lineno, reason = _first_non_utf8_line(path)
                raise DatasetError(f"{path}:{lineno}: not valid UTF-8 ({reason})") from exc
            except csv.Error as exc:
                raise DatasetError(f"{path}:{lineno}: malformed TSV ({exc})") from exc


class _CountedLines:
    """An iterator over a file's lines that knows how many it has handed out."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines = lines
        self.count = 0

    def __iter__(self) -> _CountedLines:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.count += 1
        return line


def records(fh: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """``(first physical line, cells)`` of every tab-separated record, as ``csv.reader`` splits them.

    A line without a double quote cannot start or hold a quoted cell, so it is split on tabs directly,
    which is several times faster than the csv module on megabyte-long base64 cells. A line with a
    quote is handed to ``csv.reader``, which reads on over further lines until the record ends (a
    quoted cell may hold tabs and newlines). Open the file with ``newline=""``, as for ``csv``.
    """
    lines = _CountedLines(iter(fh))
    for line in lines:
        first = lines.count
        if '"' not in line:
            body = line.rstrip("\r\n")
            yield first, body.split("\t") if body else []
        else:
            reader = csv.reader(itertools.chain([line], lines), delimiter="\t")
            yield first, next(reader, [])


def _first_non_utf8_line(path: Path) -> tuple[int, str]:
    """The first physical line that is not UTF-8 (a UTF-8 character never contains a newline byte)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return lineno, f"{exc.reason} at byte {exc.start} of the line"
    return 1, "undecodable text"


def _decode_cell(cell: str, where: str) -> tuple[bytes, ...]:
    """A row's own image cell: base64, or a stringified list of base64 strings."""
    parts = _list_cell(cell, where)
    out = []
    for k, part in enumerate(parts, start=1):
        label = f"{where}: image {k} of {len(parts)}" if len(parts) > 1 else where
        out.append(_b64_image(part, label))
    return tuple(out)


def _b64_image(text: str, where: str) -> bytes:
    """Decode a base64 image and check it; the strict base64 check only runs to explain a failure."""
    try:
        data = base64.b64decode(text)  # lenient (skips stray characters), like VLMEvalKit's decoder
    except (binascii.Error, ValueError) as exc:
        raise _not_base64(text, where) from exc
    try:
        return check_image_bytes(data, where)
    except DatasetError:
        try:
            base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise _not_base64(text, where) from None
        raise


def _not_base64(text: str, where: str) -> DatasetError:
    shown = text[:20] + "..." if len(text) > 20 else text
    return DatasetError(
        f"{where}: image cell {shown!r} is neither base64 nor the index of a row with an image"
    )


def _list_cell(cell: str, where: str) -> list[str]:
    """VLMEvalKit's ``toliststr``: ``"[a, b]"`` is a stringified list, anything else one item."""
    text = cell.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [cell]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise DatasetError(f"{where}: cell starts with '[' but is not a list literal") from exc
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise DatasetError(f"{where}: a list cell must hold one or more non-empty strings")
    return value
