"""Columnar per-sample results: Parquet shards committed through the record log.

A run folder that stores tables this way holds, beside the :class:`lens.records.RecordWriter` log:

    records.jsonl              one small JSON line per finished sample: the commit marker
    records/part-<id>.parquet  the samples' rows; one row group per sample, several samples per file

Writes go in this order: a shard is written to a temporary file, fsynced and renamed into place; only
then are its samples' lines appended to the log (each fsynced by the writer). A line therefore always
points at a complete file, and a sample counts as done exactly when its line exists. A crash before
or between the lines leaves rows that no line points at: readers never see them (they go through the
log), and :meth:`ShardWriter.tidy` removes them on the next run, before anything new is written.

Samples are buffered and written together (``rows_per_shard`` rows, or after ``flush_seconds``), so
a 1,000-item 7B run makes ~20 files instead of 1,000. Leaving the writer's ``with`` block writes what
is buffered, also when an exception (Ctrl-C, a bad image) ends the run; only a hard kill loses the
buffer, and those samples were not committed, so a resumed run recomputes them.

The folder assumes one writer at a time (the run lock on ``--out`` guarantees it).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lens.errors import DatasetError
from lens.records import RecordWriter, atomic_write, iter_records

#: Key of a record line that points at the sample's rows.
PAYLOAD = "table"
#: Shard file names (only these are ever removed by :meth:`ShardWriter.tidy`).
SHARD_GLOB = "part-*.parquet"


def shard_folder(log_path: str | Path) -> Path:
    """The shard folder of a record log: ``records.jsonl`` -> ``records/``."""
    log_path = Path(log_path)
    return log_path.with_name(log_path.stem)


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """Writer options: zstd, dictionary pages for categorical columns, byte-stream split for floats.

    Byte-stream split groups the exponent bytes of float columns, which zstd then compresses well;
    level 1 keeps writing fast (higher levels gained < 1% on lens outputs).
    """
    floats = [f.name for f in schema if pa.types.is_floating(f.type)]
    categorical = [f.name for f in schema if pa.types.is_dictionary(f.type) or pa.types.is_string(f.type)]
    return {
        "compression": "zstd",
        "compression_level": 1,
        "use_dictionary": categorical,
        "use_byte_stream_split": floats or False,
    }


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplePart:
    """Where one sample's rows are: a row group of a shard, an in-memory table, or a loader.

    Attributes:
        sample_id: The sample.
        path: Shard file (with ``row_group``).
        row_group: Row group of the sample in ``path``.
        table: The rows, when held in memory.
        loader: Builds the rows on demand (e.g. from an older record format).
        fields: The other fields of the sample's record line (e.g. how its rows are laid out).
    """

    sample_id: str
    path: Path | None = None
    row_group: int | None = None
    table: pa.Table | None = None
    loader: Callable[[], pa.Table] | None = None
    fields: dict[str, Any] = field(default_factory=dict, compare=False)

    def read(self, columns: Sequence[str] | None = None, files: dict[Path, Any] | None = None) -> pa.Table:
        """The sample's rows (only ``columns``, when given)."""
        if self.table is not None:
            return self.table if columns is None else self.table.select(list(columns))
        if self.loader is not None:
            table = self.loader()
            return table if columns is None else table.select(list(columns))
        assert self.path is not None and self.row_group is not None
        handle = None if files is None else files.get(self.path)
        if handle is None:
            handle = _open_shard(self.path)
            if files is not None:
                files[self.path] = handle
        try:
            return handle.read_row_group(self.row_group, columns=None if columns is None else list(columns))
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(
                f"{self.path}: cannot read the rows of sample {self.sample_id!r} ({exc})"
            ) from exc


def _open_shard(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise DatasetError(f"{path} is missing (the record log points at it); rerun with --no-resume")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path} is not a readable Parquet file ({exc})") from exc


@dataclass(frozen=True)
class ColumnarTable:
    """A tidy table kept as ordered per-sample parts: nothing is loaded until it is read.

    Iterate it part by part (:meth:`iter_tables`) to stay within one sample's memory; build one
    table only for small runs (:meth:`to_pandas`), or stream it to a file (:meth:`write_parquet`,
    :meth:`write_csv`).
    """

    parts: tuple[SamplePart, ...]
    schema: pa.Schema | None = field(default=None, compare=False)

    @property
    def sample_ids(self) -> list[str]:
        return [p.sample_id for p in self.parts]

    def __len__(self) -> int:
        return len(self.parts)

    def iter_tables(self, columns: Sequence[str] | None = None) -> Iterator[tuple[SamplePart, pa.Table]]:
        """``(part, rows)`` for every sample in order, one sample in memory at a time."""
        files: dict[Path, Any] = {}
        for part in self.parts:
            yield part, part.read(columns, files)

    def select(self, sample_ids: Iterable[str]) -> ColumnarTable:
        """The parts of ``sample_ids`` (in this table's order)."""
        wanted = {str(s) for s in sample_ids}
        return ColumnarTable(tuple(p for p in self.parts if p.sample_id in wanted), self.schema)

    def to_arrow(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All rows as one Arrow table (memory grows with the run; use for small runs or a few samples)."""
        tables = [t for _, t in self.iter_tables(columns)]
        if not tables:
            if self.schema is None:
                raise DatasetError("the table has no samples")
            schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables).unify_dictionaries()

    def to_pandas(self, columns: Sequence[str] | None = None) -> Any:
        """All rows as a DataFrame (categorical ids and roles, compact numeric types)."""
        return self.to_arrow(columns).to_pandas()

    def write_parquet(self, path: str | Path) -> Path:
        """Stream every part into one Parquet file (a row group per sample), atomically."""
        schema = self._output_schema()

        def write(tmp: Path) -> None:
            with pq.ParquetWriter(tmp, schema, **parquet_options(schema)) as writer:
                for _, table in self.iter_tables():
                    writer.write_table(table.cast(schema), row_group_size=max(table.num_rows, 1))

        return atomic_write(path, write)

    def write_csv(self, path: str | Path) -> Path:
        """Stream every part into one CSV file (header once, categorical columns as text), atomically."""
        import pyarrow.csv as pacsv

        schema = pa.schema(
            [
                pa.field(f.name, f.type.value_type) if pa.types.is_dictionary(f.type) else f
                for f in self._output_schema()
            ]
        )

        def write(tmp: Path) -> None:
            with pacsv.CSVWriter(tmp, schema) as writer:
                for _, table in self.iter_tables():
                    writer.write_table(table.cast(schema))

        return atomic_write(path, write)

    def _output_schema(self) -> pa.Schema:
        if self.schema is not None:
            return self.schema
        if not self.parts:
            raise DatasetError("the table has no samples")
        return self.parts[0].read().schema

    @classmethod
    def from_arrow(cls, table: pa.Table, sample_id: str = "") -> ColumnarTable:
        """One in-memory part holding ``table``."""
        return cls((SamplePart(sample_id, table=table),), table.schema)


def table_from_records(
    records: Iterable[dict[str, Any]],
    base_dir: str | Path,
    schema: pa.Schema | None = None,
    fallback: Callable[[dict[str, Any]], pa.Table] | None = None,
) -> ColumnarTable:
    """The table of committed record lines, in their order.

    Args:
        records: Record lines (e.g. :meth:`lens.records.RecordWriter.read`).
        base_dir: Folder the lines' shard paths are relative to (the log's folder).
        schema: The table's schema, when known.
        fallback: Builds the rows of a line without a shard pointer (an older record format).

    Raises:
        DatasetError: A line has neither a pointer nor a fallback.
    """
    base = Path(base_dir)
    parts = []
    for record in records:
        sample_id = str(record["sample_id"])
        pointer = record.get(PAYLOAD)
        fields = {k: v for k, v in record.items() if k not in ("sample_id", PAYLOAD)}
        if pointer is not None:
            row_group = int(pointer["row_group"])
            parts.append(
                SamplePart(sample_id, path=base / pointer["file"], row_group=row_group, fields=fields)
            )
        elif fallback is not None:
            parts.append(SamplePart(sample_id, loader=lambda r=record: fallback(r), fields=fields))
        else:
            raise DatasetError(f"the record of sample {sample_id!r} holds no table")
    return ColumnarTable(tuple(parts), schema)


# -- writing ----------------------------------------------------------------------------------------


@dataclass
class _Pending:
    sample_id: str
    table: pa.Table
    fields: dict[str, Any]


class ShardWriter:
    """Buffers per-sample tables and commits them: Parquet shard first, then the log lines.

    Args:
        log: The run's record log; a sample's line is written only after its rows are on disk.
        schema: Schema of every sample's table.
        rows_per_shard: Write a shard once this many rows are buffered (memory of the buffer).
        flush_seconds: ... or once the oldest buffered sample is this old (bounds the work a hard
            kill can lose).

    Use as a context manager: leaving the block writes what is buffered, even on an exception.
    Opening it first runs :meth:`tidy`.
    """

    def __init__(
        self,
        log: RecordWriter,
        schema: pa.Schema,
        rows_per_shard: int = 1 << 21,
        flush_seconds: float = 60.0,
    ) -> None:
        self.log = log
        self.schema = schema
        self.folder = shard_folder(log.path)
        self.rows_per_shard = rows_per_shard
        self.flush_seconds = flush_seconds
        self._pending: list[_Pending] = []
        self._rows = 0
        self._since = 0.0
        self.tidy()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.flush()
            self.tidy()  # shards of lines the first new record replaced (--no-resume, superseded samples)
        except Exception:
            if exc_type is None:
                raise
            # The run is already failing: keep its exception; the unflushed samples were never
            # committed, so a resumed run recomputes them.

    def add(self, sample_id: str, table: pa.Table, fields: dict[str, Any] | None = None) -> None:
        """Buffer one sample's rows (and the small fields of its log line); may write a shard."""
        sample_id = str(sample_id)
        if sample_id in self.log or any(p.sample_id == sample_id for p in self._pending):
            raise ValueError(f"sample {sample_id!r} was already written")
        if not table.schema.equals(self.schema):
            raise ValueError(f"the table of sample {sample_id!r} does not have the writer's schema")
        if not self._pending:
            self._since = time.monotonic()
        self._pending.append(_Pending(sample_id, table, dict(fields or {})))
        self._rows += table.num_rows
        if self._rows >= self.rows_per_shard or time.monotonic() - self._since >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one shard, then commit their lines in order."""
        if not self._pending:
            return
        pending, self._pending, self._rows = self._pending, [], 0
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"part-{uuid.uuid4().hex[:16]}.parquet"

        def write(tmp: Path) -> None:
            with pq.ParquetWriter(tmp, self.schema, **parquet_options(self.schema)) as writer:
                for item in pending:
                    writer.write_table(item.table, row_group_size=max(item.table.num_rows, 1))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())

        atomic_write(path, write)
        _fsync_folder(self.folder)
        relative = path.relative_to(self.log.path.parent).as_posix()
        for row_group, item in enumerate(pending):
            pointer = {"file": relative, "row_group": row_group, "rows": item.table.num_rows}
            self.log.write(item.sample_id, {**item.fields, PAYLOAD: pointer})

    @staticmethod
    def _pointers(records: Any) -> dict[str, set[int]]:
        groups: dict[str, set[int]] = {}
        for record in records:
            pointer = record.get(PAYLOAD)
            if pointer is not None:
                groups.setdefault(pointer["file"], set()).add(int(pointer["row_group"]))
        return groups

    def tidy(self) -> None:
        """Remove rows no committed line points at: temporary files, orphan shards, uncommitted tails.

        A shard whose first k row groups are committed and whose later ones are not (the run died
        between its lines) is rewritten with the first k only. Runs before anything new is written.

        Raises:
            DatasetError: A committed line points at a shard that is missing.
        """
        # Lines this run keeps (on --no-resume, none; superseded samples' lines are dropped) must find
        # their shards; but a shard that any line of the file still points at stays until the file
        # is replaced by the first new record, so an early failure of a --no-resume run destroys
        # nothing (the next tidy, e.g. when this writer closes, removes what became orphan).
        current = self._pointers(iter(self.log))
        committed = self._pointers(iter_records(self.log.path))
        base = self.log.path.parent
        missing = sorted(name for name in current if not (base / name).is_file())
        if missing:
            raise DatasetError(
                f"{self.log.path} points at {missing[0]}, which is missing; rerun with --no-resume"
            )
        if not self.folder.is_dir():
            return
        for tmp in self.folder.glob(f".{SHARD_GLOB}.tmp*"):
            tmp.unlink(missing_ok=True)
        for path in sorted(self.folder.glob(SHARD_GLOB)):
            groups = committed.get(path.relative_to(base).as_posix())
            if groups is None:
                path.unlink()
                continue
            shard = _open_shard(path)
            keep = len(groups)
            if shard.num_row_groups > keep and groups == set(range(keep)):
                tables = [shard.read_row_group(i) for i in range(keep)]

                def write(
                    tmp: Path, tables: list[pa.Table] = tables, schema: pa.Schema = shard.schema_arrow
                ) -> None:
                    with pq.ParquetWriter(tmp, schema, **parquet_options(schema)) as writer:
                        for table in tables:
                            writer.write_table(table, row_group_size=max(table.num_rows, 1))
                    with open(tmp, "rb") as fh:
                        os.fsync(fh.fileno())

                atomic_write(path, write)
