"""Which column holds which :class:`Sample` field, and turning one row's cells into a ``Sample``.

Every reader gives its rows to :class:`RowBuilder` as plain ``{column: value}`` mappings, so the
field rules (required fields, options, hint, meta) are the same for JSONL, TSV and Parquet.
"""

from __future__ import annotations

import ast
import math
import string
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lens.datasets.sample import ImageRef, Sample
from lens.errors import ConfigError, DatasetError

# Field -> the column names looked for, in order, when the caller maps nothing.
# ``index`` and ``category`` are VLMEvalKit's names; ``images`` holds several images.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "id": ("id", "index"),
    "question": ("question",),
    "answer": ("answer",),
    "response": ("response",),
    "hint": ("hint",),
    "qtype": ("qtype", "category"),
    "split": ("split",),
    "options": ("options",),
    "image": ("image", "images"),
    "image_path": ("image_path",),
}
FIELDS: tuple[str, ...] = tuple(DEFAULT_COLUMNS)
LETTERS: tuple[str, ...] = tuple(string.ascii_uppercase)


def parse_columns(text: str | None) -> dict[str, str]:
    """Parse a ``--columns`` value such as ``"question=query,answer=gt,image=decoded_image"``.

    Returns:
        ``{field: column}``; empty for ``None`` or an empty string.

    Raises:
        ConfigError: An item without ``=``, an empty name, an unknown field, or a field given twice.
    """
    mapping: dict[str, str] = {}
    if not text or not text.strip():
        return mapping
    for item in text.split(","):
        field_name, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not field_name or not column:
            raise ConfigError(f"--columns: expected FIELD=COLUMN, got {item.strip()!r}")
        if field_name in mapping:
            raise ConfigError(f"--columns: field {field_name!r} is mapped twice")
        mapping[field_name] = column
    return check_mapping(mapping)


def check_mapping(columns: Mapping[str, str] | None) -> dict[str, str]:
    """Validate a ``{field: column}`` mapping (unknown fields, non-string names).

    Raises:
        ConfigError: A field that :class:`Sample` does not have, or a column name that is not a string.
    """
    mapping = dict(columns or {})
    for field_name, column in mapping.items():
        if field_name not in DEFAULT_COLUMNS:
            raise ConfigError(
                f"unknown dataset field {field_name!r} in the column mapping; fields: {', '.join(FIELDS)}"
            )
        if not isinstance(column, str) or not column:
            raise ConfigError(f"column mapping {field_name!r}: expected a column name, got {column!r}")
    return mapping


@dataclass(frozen=True)
class ColumnMap:
    """The caller's ``{field: column}`` mapping, with the default names for unmapped fields."""

    mapping: Mapping[str, str]

    def column(self, field_name: str, keys: Collection[str]) -> str | None:
        """The column that holds ``field_name`` among ``keys``, or ``None`` if there is none."""
        if field_name in self.mapping:
            column = self.mapping[field_name]
            return column if column in keys else None
        return next((c for c in DEFAULT_COLUMNS[field_name] if c in keys), None)

    def check_header(self, keys: Sequence[str], source: str) -> None:
        """Refuse a mapping that names a missing column, or a file with two image columns.

        Raises:
            DatasetError: Naming the file, the missing column and the columns it has.
        """
        for field_name, column in self.mapping.items():
            if column not in keys:
                raise DatasetError(
                    f"{source}: column {column!r} (mapped to {field_name!r}) not found; "
                    f"columns: {', '.join(map(str, keys))}"
                )
        if "image" not in self.mapping and all(c in keys for c in DEFAULT_COLUMNS["image"]):
            raise DatasetError(
                f"{source}: both 'image' and 'images' columns; choose one with columns={{'image': NAME}}"
            )


def is_missing(value: Any) -> bool:
    """``None``, a float NaN (pandas' empty cell) or an empty string."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def to_text(value: Any, what: str, where: str) -> str | None:
    """A cell as text: scalars are written out, UTF-8 bytes decoded, missing cells give ``None``.

    Raises:
        DatasetError: Bytes that are not UTF-8, or a list/mapping where text was expected.
    """
    if is_missing(value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(
                f"{where}: {what!r} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from exc
    if isinstance(value, (bool, int, float)):
        return str(value)
    raise DatasetError(f"{where}: {what!r} must be text, got {type(value).__name__}")


class RowBuilder:
    """Turns ``{column: value}`` rows into :class:`Sample` objects with one set of field rules.

    Args:
        columns: The caller's ``{field: column}`` mapping.
        na_strings: Cell texts that count as "no value" for ``hint`` and option cells (VLMEvalKit
            tests those with ``pd.isna`` after a default ``pd.read_csv``; TSV passes pandas' NA set).
        empty_options_error: An ``options`` cell that is present but empty is an error (JSONL, where
            writing ``"options": {}`` declares a multiple-choice item) rather than "no options"
            (Parquet, where a list column holds ``[]`` for every open question).
    """

    def __init__(
        self,
        columns: Mapping[str, str] | None = None,
        na_strings: Collection[str] = (),
        empty_options_error: bool = False,
    ) -> None:
        self.columns = ColumnMap(check_mapping(columns))
        self.na_strings = frozenset(na_strings)
        self.empty_options_error = empty_options_error

    def label(self, field_name: str) -> str:
        """How messages name a field's column: ``'query' (mapped to 'question')`` or ``'id' or 'index'``."""
        if field_name in self.columns.mapping:
            return f"{self.columns.mapping[field_name]!r} (mapped to {field_name!r})"
        return " or ".join(repr(c) for c in DEFAULT_COLUMNS[field_name])

    def check_header(self, keys: Sequence[str], source: str) -> None:
        """For files with a header: mapped columns exist, and so do the id and question columns.

        Raises:
            DatasetError: Naming the file, the missing column and the columns it has.
        """
        self.columns.check_header(keys, source)
        for field_name in ("id", "question"):
            if self.columns.column(field_name, keys) is None:
                hint = (
                    f"; map one with columns={{{field_name!r}: NAME}}"
                    if field_name not in self.columns.mapping
                    else ""
                )
                raise DatasetError(
                    f"{source}: no {self.label(field_name)} column{hint}; "
                    f"columns: {', '.join(map(str, keys))}"
                )

    def image_columns(self, keys: Collection[str]) -> tuple[str | None, str | None]:
        """The ``image`` and ``image_path`` columns among ``keys`` (each ``None`` when absent)."""
        return self.columns.column("image", keys), self.columns.column("image_path", keys)

    def build(self, row: Mapping[str, Any], images: Sequence[ImageRef], where: str) -> Sample:
        """One sample from one row; ``images`` are already resolved by the reader.

        Raises:
            DatasetError: A missing id or question, or malformed options (naming ``where``).
        """
        keys = row.keys()
        used = {c for f in FIELDS if (c := self.columns.column(f, keys)) is not None}

        def text(field_name: str) -> str | None:
            column = self.columns.column(field_name, keys)
            return None if column is None else to_text(row[column], column, where)

        for required in ("id", "question"):
            if self.columns.column(required, keys) is None:
                present = ", ".join(map(str, keys))
                raise DatasetError(
                    f"{where}: missing required field {self.label(required)} (row has: {present})"
                )
        sample_id = text("id")
        if sample_id is None or not sample_id.strip():
            raise DatasetError(f"{where}: missing required field {self.label('id')}")
        question = text("question")
        if question is None:
            raise DatasetError(f"{where}: missing required field {self.label('question')}")
        if not question.strip():
            raise DatasetError(f"{where}: {self.label('question')} must be a non-empty string")
        hint = text("hint")
        if hint is not None and hint in self.na_strings:
            hint = None

        options_column = self.columns.column("options", keys)
        if options_column is not None:
            options = self._options_cell(row[options_column], options_column, where)
        else:
            letter_columns = [c for c in LETTERS if c in keys]
            used.update(letter_columns)
            options = self._letter_options(row, letter_columns, where)

        meta = {k: v for k, v in row.items() if k not in used and not _holds_bytes(v)}
        return Sample(
            id=sample_id,
            question=question,
            images=tuple(images),
            answer=text("answer"),
            response=text("response"),
            options=options,
            hint=hint,
            qtype=text("qtype"),
            split=text("split"),
            meta=meta,
        )

    def _missing_option(self, value: Any) -> bool:
        return is_missing(value) or (isinstance(value, str) and value in self.na_strings)

    def _letter_options(
        self, row: Mapping[str, Any], letters: Iterable[str], where: str
    ) -> tuple[tuple[str, str], ...]:
        # VLMEvalKit's rule: the columns A..Z whose cell is not NaN, in letter order.
        return tuple(
            (letter, str(to_text(row[letter], letter, where)))
            for letter in letters
            if not self._missing_option(row[letter])
        )

    def _options_cell(self, value: Any, column: str, where: str) -> tuple[tuple[str, str], ...]:
        if is_missing(value):
            return ()
        if isinstance(value, str):
            stripped = value.strip()
            if stripped[:1] in "[{" and stripped[-1:] in "]}":
                try:
                    value = ast.literal_eval(stripped)
                except (ValueError, SyntaxError) as exc:
                    raise DatasetError(f"{where}: {column!r} cannot be parsed as a list or mapping") from exc
            else:
                raise DatasetError(
                    f"{where}: {column!r} must be a list of option texts or a letter -> text mapping"
                )
        if isinstance(value, Mapping):
            pairs = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            if len(value) > len(LETTERS):
                raise DatasetError(
                    f"{where}: {column!r} has {len(value)} options; at most {len(LETTERS)} (A-Z)"
                )
            pairs = list(zip(LETTERS, value, strict=False))
        else:
            raise DatasetError(
                f"{where}: {column!r} must be a list of option texts or a letter -> text mapping, "
                f"got {type(value).__name__}"
            )
        options = tuple(
            (letter, str(to_text(text, f"{column}[{letter}]", where)))
            for letter, text in pairs
            if not self._missing_option(text)
        )
        if not options and self.empty_options_error:
            raise DatasetError(
                f"{where}: {column!r} is given but empty: a multiple-choice item needs its options "
                f"(drop the field for an open question)"
            )
        return options


def check_choice_answers(samples: Sequence[Sample], places: Sequence[str]) -> None:
    """Refuse a multiple-choice item without options.

    In a dataset where some items have options, an item without any whose answer is one of those
    option letters is a multiple-choice item that lost its options (an empty row of option cells),
    so it could never be scored as intended.

    Raises:
        DatasetError: Naming the item's file and row.
    """
    letters = {letter for s in samples for letter, _ in s.options}
    if not letters:
        return
    for sample, where in zip(samples, places, strict=True):
        if not sample.options and sample.answer is not None and sample.answer.strip() in letters:
            raise DatasetError(
                f"{where}: answer {sample.answer.strip()!r} is an option letter, but the item has no "
                f"options (other items have options {', '.join(sorted(letters))})"
            )


def finish(samples: list[Sample], places: list[str], source: str) -> list[Sample]:
    """Checks over the whole dataset: not empty, ids unique, no choice item without options.

    Raises:
        DatasetError: No samples, a duplicate id (naming both rows), or a choice item without options.
    """
    if not samples:
        raise DatasetError(f"dataset has no samples: {source}")
    first: dict[str, str] = {}
    for sample, where in zip(samples, places, strict=True):
        if sample.id in first:
            raise DatasetError(f"{where}: duplicate id {sample.id!r} (first at {first[sample.id]})")
        first[sample.id] = where
    check_choice_answers(samples, places)
    return samples


def _holds_bytes(value: Any) -> bool:
    """Image payloads stay out of ``meta`` (it is written to the records)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return True
    if isinstance(value, Mapping):
        return any(_holds_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_bytes(v) for v in value)
    return False
