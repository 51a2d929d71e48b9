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
- The options are the columns ``A``..``Z`` whose cell is not empty (``pd.isna`` in VLMEvalKit), in
  letter order (``ImageMCQDataset.build_prompt``); an empty ``hint`` is no hint.

Differences, on purpose: cells are kept as the text in the file (VLMEvalKit's ``pd.read_csv`` turns an
option column ``3``/empty into ``3.0``/NaN); a row with an empty ``image`` cell becomes a text-only
item instead of being dropped; rows are numbered by their first physical line (1 = the header).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import sys
from collections.abc import Mapping
from pathlib import Path

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
    header, rows = _read_rows(path)
    builder.check_header(header, str(path))
    id_column = builder.columns.column("id", header)
    image_column, path_column = builder.image_columns(header)
    holders: dict[str, tuple[str, str]] = {}  # index -> (its image cell, where); refs point here
    if image_column is not None:
        for lineno, row in rows:
            index, cell = row[id_column], row[image_column]
            if index is not None and cell is not None and index not in holders:
                holders[index] = (cell, f"{path}:{lineno}")
    images = _ImageCells(holders)

    samples: list[Sample] = []
    places: list[str] = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        found: tuple[ImageRef, ...] = ()
        if image_column is not None and row[image_column]:
            found = images.resolve(row[image_column], row[id_column], where)
        elif path_column is not None and row[path_column]:
            found = tuple(
                resolve_image_path(p, path.parent, where) for p in _list_cell(row[path_column], where)
            )
        samples.append(builder.build(row, found, where))
        places.append(where)
    return finish(samples, places, str(path))


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str | None]]]]:
    """The header and every row as ``(first line number, {column: cell or None})``."""
    # Base64 cells are far larger than the csv module's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    rows: list[tuple[int, dict[str, str | None]]] = []
    header: list[str] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        next_line = 1
        try:
            for cells in reader:
                lineno, next_line = next_line, reader.line_num + 1
                if not cells:
                    continue
                if not header:
                    header = cells
                    duplicated = sorted({c for c in header if header.count(c) > 1})
                    if duplicated:
                        raise DatasetError(f"{path}:{lineno}: duplicate columns {', '.join(duplicated)}")
                    continue
                if len(cells) != len(header):
                    raise DatasetError(
                        f"{path}:{lineno}: {len(cells)} cells, but the header has {len(header)} columns"
                    )
                rows.append(
                    (lineno, {c: (v if v != "" else None) for c, v in zip(header, cells, strict=True)})
                )
        except UnicodeDecodeError as exc:
            # The text layer decodes ahead in blocks, so find the line in the raw bytes.
            lineno, reason = _first_non_utf8_line(path)
            raise DatasetError(f"{path}:{lineno}: not valid UTF-8 ({reason})") from exc
        except csv.Error as exc:
            raise DatasetError(f"{path}:{next_line}: malformed TSV ({exc})") from exc
    if not header:
        raise DatasetError(f"dataset has no samples: {path}")
    return header, rows


def _first_non_utf8_line(path: Path) -> tuple[int, str]:
    """The first physical line that is not UTF-8 (a UTF-8 character never contains a newline byte)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return lineno, f"{exc.reason} at byte {exc.start} of the line"
    return 1, "undecodable text"


class _ImageCells:
    """Decodes each row's ``image`` cell once; rows that reuse another row's image share its bytes."""

    def __init__(self, holders: dict[str, tuple[str, str]]) -> None:
        self.holders = holders
        self.decoded: dict[str, tuple[bytes, ...]] = {}

    def resolve(self, cell: str, index: str | None, where: str) -> tuple[bytes, ...]:
        if len(cell) <= INDEX_REF_MAX_CHARS:
            # VLMEvalKit: a short cell names the row that holds the image, which must hold base64 itself.
            holder = self.holders.get(cell)
            if holder is None or len(holder[0]) <= INDEX_REF_MAX_CHARS:
                raise DatasetError(
                    f"{where}: image cell {cell!r} is neither base64 nor the index of a row with an image"
                )
            key, (data, data_where) = cell, holder
        else:
            key, data, data_where = f"\0{where}" if index is None else index, cell, where
        if key not in self.decoded:
            self.decoded[key] = self._decode(data, data_where)
        return self.decoded[key]

    @staticmethod
    def _decode(cell: str, where: str) -> tuple[bytes, ...]:
        parts = _list_cell(cell, where)
        out = []
        for k, part in enumerate(parts, start=1):
            label = f"{where}: image {k} of {len(parts)}" if len(parts) > 1 else where
            out.append(check_image_bytes(_b64(part, label), label))
        return tuple(out)


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # base64 wrapped over several lines (MIME style) is still base64
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        shown = text[:20] + "..." if len(text) > 20 else text
        raise DatasetError(
            f"{where}: image cell {shown!r} is neither base64 nor the index of a row with an image"
        ) from exc


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
