"""Per-sample result files that survive interruption: each record is written once, never twice.

A run appends one JSON line per finished sample and flushes it to disk. On resume the file is
read back; a torn last line (the process died mid-write) is cut off, and samples whose ids are
already present are skipped. Every later analysis (drift, interventions, replay, evaluation) uses
this one writer.

What the records depend on is stored beside them (``<name>.settings.json``): the run's settings and
its fingerprint (checkpoint identities, dtype, device type; :mod:`lens.fingerprint`). A resume with
other settings or another fingerprint is refused, naming what changed. Each record also carries the
digest of its sample's inputs (``_inputs``) and of the run's settings (``_run``): a record whose
sample changed since is recomputed, and its old line is dropped, so it is never counted twice.

Nothing is deleted before the first new record exists: ``resume=False`` and the removal of stale
records take effect when the first record is written, through a temporary file renamed over the old
one. A run refused or failed before that leaves the previous results as they were. The writer holds
the output folder's lock (:mod:`lens.outdir`) until :meth:`RecordWriter.close`.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lens.errors import ConfigError, DatasetError
from lens.fingerprint import describe_changes, without_paths

#: Record fields the writer owns; they are stripped from what :meth:`RecordWriter.read` returns.
INPUTS_FIELD, RUN_FIELD = "_inputs", "_run"


def _canonical(value: Any) -> Any:
    return None if value is None else json.loads(json.dumps(value, sort_keys=True, default=str))


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    record.pop(INPUTS_FIELD, None)
    record.pop(RUN_FIELD, None)
    return record


class RecordLog:
    """A record file read-only: its current records under given settings, fingerprint and inputs.

    The reading half of :class:`RecordWriter`, with the same checks; it takes no lock and changes
    nothing (a torn last line is ignored, not cut off). Sharded runs read the main folder's log this
    way, and :mod:`lens.distributed` merges shard logs with it.

    Args:
        path: The JSONL file (it need not exist).
        settings: What the records depend on; stored records with other settings are refused.
        fingerprint: Checkpoint identities, dtype and device type; another one is refused.
        inputs: ``{record key: digest of the sample's inputs}``: a record whose digest differs is
            not current.

    Raises:
        ConfigError: ``settings`` or ``fingerprint`` differ from the stored ones.
        DatasetError: A corrupt line.
    """

    def __init__(
        self,
        path: str | Path,
        settings: dict[str, Any] | None = None,
        fingerprint: dict[str, Any] | None = None,
        inputs: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> None:
        self.path = Path(path)
        self.settings_path = settings_path(self.path)
        self.inputs = {str(k): v for k, v in (inputs or {}).items()}
        self.done: set[str] = set()
        self._settings = _canonical(settings)
        self._fingerprint = _canonical(fingerprint)
        self._run = run_stamp(self._settings, self._fingerprint)
        self._keep: list[tuple[int, int]] | None = None  # byte ranges to keep when the file is replaced
        if check and self.path.exists():
            self._check_stored()
            self._scan(truncate=False)

    # -- resume ---------------------------------------------------------------------------------
    def _check_stored(self) -> None:
        if self._settings is None and self._fingerprint is None:
            return
        stored_settings, stored_fingerprint = read_settings(self.settings_path)
        hint = "rerun with --no-resume or use another output folder"
        if self._settings is not None and stored_settings is not None and stored_settings != self._settings:
            changed = changed_settings(stored_settings, self._settings)
            raise ConfigError(
                f"{self.path} holds records made with other settings ({', '.join(changed)}); {hint}"
            )
        if self._fingerprint is not None:
            if stored_fingerprint is None:
                raise ConfigError(
                    f"{self.path} holds records without a fingerprint of the models they came from "
                    f"(an older replay-lens); {hint}"
                )
            changes = describe_changes(stored_fingerprint, self._fingerprint)
            if changes:
                raise ConfigError(
                    f"{self.path} holds records made with other models: {'; '.join(changes)}; {hint}"
                )

    def _scan(self, truncate: bool) -> None:
        raw = self.path.read_bytes()
        good = raw.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if truncate and good != len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
        keep: list[tuple[int, int]] = []
        start = 0
        for lineno, line in enumerate(raw[:good].splitlines(keepends=True), start=1):
            span = (start, start + len(line))
            start = span[1]
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DatasetError(f"{self.path}:{lineno}: corrupt record ({exc})") from exc
            key = str(record["sample_id"])
            if self._current(key, record):
                self.done.add(key)
                keep.append(span)
        if len(keep) < raw[:good].count(b"\n"):
            self._keep = keep  # superseded lines go when the first new record is written

    def _current(self, key: str, record: dict[str, Any]) -> bool:
        """Whether a stored record still holds for this run's settings and this sample's inputs.

        A record stamped by another run (possible only if a run died between writing the settings
        and its first record) does not; one from before run stamps does when the settings matched.
        """
        if self._run is not None and record.get(RUN_FIELD, self._run) != self._run:
            return False
        return key not in self.inputs or record.get(INPUTS_FIELD) == self.inputs[key]

    def __contains__(self, sample_id: str) -> bool:
        return str(sample_id) in self.done

    # -- reading --------------------------------------------------------------------------------
    def lines(self) -> dict[str, dict[str, Any]]:
        """The current record of every done key as stored (writer fields included), in the run's
        order (that of ``inputs``), then file order; the last line of a key wins."""
        latest: dict[str, dict[str, Any]] = {}
        for record in iter_records(self.path):
            key = str(record["sample_id"])
            if key in self.done and self._current(key, record):
                latest[key] = record
        if self.inputs:
            order = {key: i for i, key in enumerate(self.inputs)}
            latest = dict(sorted(latest.items(), key=lambda item: order.get(item[0], len(order))))
        return latest

    def _latest(self) -> dict[str, dict[str, Any]]:
        """The record of every current key, in the run's order (that of ``inputs``), then file order.

        The run's order makes a resumed run's tables equal an uninterrupted run's, even when
        superseded samples were recomputed (and so appended) last.
        """
        return {key: _strip(record) for key, record in self.lines().items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._latest().values()))

    def read(self, sample_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The records of ``sample_ids`` (in the run's order), e.g. this run's subset of a larger file."""
        wanted = {str(i) for i in sample_ids}
        return [r for k, r in self._latest().items() if k in wanted]


class RecordWriter(RecordLog):
    """Append-only JSONL of per-sample records, keyed by ``sample_id``.

    Args:
        path: The JSONL file.
        resume: Keep existing records and skip their samples; otherwise start afresh (the old file is
            replaced when the first new record is written, not before).
        settings: What the records depend on (model names, config). Resuming with different settings
            is refused, because the old records would silently be mixed with new ones.
        fingerprint: Checkpoint identities, dtype and device type (:mod:`lens.fingerprint`); resuming
            with another one is refused, naming what changed.
        inputs: ``{record key: digest of the sample's inputs}``. On resume, a record whose digest
            differs is superseded: its sample is recomputed and the old line dropped.
        shard: In a sharded run (:mod:`lens.distributed`), this process's shard: records go to the
            shard's own folder under ``path``'s, keys of other shards are not this process's to
            compute (:meth:`todo`), and keys done in the main log are skipped.

    Raises:
        ConfigError: On resume, when ``settings`` or ``fingerprint`` differ from the stored ones.
        OutputError: Another process is writing into the same folder.
    """

    def __init__(
        self,
        path: str | Path,
        resume: bool = True,
        settings: dict[str, Any] | None = None,
        fingerprint: dict[str, Any] | None = None,
        inputs: Mapping[str, str] | None = None,
        shard: Any = None,
    ) -> None:
        from lens import outdir

        self.shard = shard
        self.main: RecordLog | None = None
        if shard is not None:
            # Keys the main folder already holds (a single-process run, an earlier merge) are done.
            if resume:
                self.main = RecordLog(path, settings, fingerprint, inputs)
            path = shard.folder(Path(path).parent) / Path(path).name
        super().__init__(path, settings, fingerprint, inputs, check=False)
        self._settings_written = False
        outdir.claim(self.path.parent)
        self._finalizer = weakref.finalize(self, outdir.release, self.path.parent)
        try:
            if self.path.exists() and resume:
                self._check_stored()
                self._scan(truncate=True)
            elif self.path.exists():
                self._keep = []  # --no-resume: the old file goes when the first new record is written
        except BaseException:
            self.close()
            raise

    def todo(self, key: str) -> bool:
        """Whether this process still has to compute ``key``: not yet done, and (in a sharded run)
        this shard's and not already in the main folder's log."""
        key = str(key)
        if key in self.done:
            return False
        if self.shard is None:
            return True
        if self.main is not None and key in self.main:
            return False
        return self.shard.owns_key(key, self.inputs)

    @property
    def partial(self) -> bool:
        """True in a sharded run: this log holds one shard's records, not the run's."""
        return self.shard is not None

    # -- writing --------------------------------------------------------------------------------
    def write(self, sample_id: str, record: dict[str, Any]) -> None:
        """Append one sample's record and make it durable before returning."""
        sample_id = str(sample_id)
        if sample_id in self.done:
            raise ValueError(f"sample {sample_id!r} was already written")
        full = {"sample_id": sample_id, **record}
        if sample_id in self.inputs:
            full[INPUTS_FIELD] = self.inputs[sample_id]
        if self._run is not None:
            full[RUN_FIELD] = self._run
        line = (json.dumps(full, separators=(",", ":")) + "\n").encode("utf-8")
        if not self._settings_written:
            self._write_settings()
        if self._keep is not None:
            self._replace_with(line)
        else:
            self._append(line)
        self.done.add(sample_id)

    def _write_settings(self) -> None:
        if self._settings is not None or self._fingerprint is not None:
            write_settings(self.settings_path, self._settings, self._fingerprint)
        if self.shard is not None:
            self.shard.write_manifest(self.path.parent, self.inputs, fresh=self.main is None)
        self._settings_written = True

    def _append(self, line: bytes) -> None:
        with open(self.path, "ab") as fh:
            size = fh.tell()
            try:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            except BaseException:
                fh.truncate(size)  # e.g. a full disk: leave no torn line behind
                raise

    def _replace_with(self, line: bytes) -> None:
        keep = self._keep or []

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                if keep:
                    with open(self.path, "rb") as old:
                        for begin, end in keep:
                            old.seek(begin)
                            out.write(old.read(end - begin))
                out.write(line)
                out.flush()
                os.fsync(out.fileno())

        atomic_write(self.path, write)
        self._keep = None

    def close(self) -> None:
        """Release the output folder's lock (also done when the writer is garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def changed_settings(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[str]:
    """The setting names whose values differ between two settings mappings, sorted."""
    old, new = old or {}, new or {}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def settings_path(log: str | Path) -> Path:
    """Where a record log's settings and fingerprint are stored: ``records.jsonl`` -> ``records.settings.json``."""
    log = Path(log)
    return log.with_name(log.stem + ".settings.json")


def read_settings(path: str | Path) -> tuple[Any, Any]:
    """``(settings, fingerprint)`` of a settings file (``(None, None)`` when there is none)."""
    path = Path(path)
    if not path.exists():
        return None, None
    stored = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(stored, dict) and set(stored) == {"settings", "fingerprint"}:
        return stored["settings"], stored["fingerprint"]
    return stored, None  # written by replay-lens before fingerprints


def write_settings(path: str | Path, settings: Any, fingerprint: Any) -> None:
    """Store a log's settings and fingerprint, atomically."""
    text = json.dumps({"settings": settings, "fingerprint": fingerprint}, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def run_stamp(settings: Any, fingerprint: Any) -> str | None:
    """The digest each record carries of the settings and models it was made with (paths aside: a
    moved checkpoint is the same)."""
    if settings is None and fingerprint is None:
        return None
    content = None if fingerprint is None else without_paths(fingerprint)
    stamp = json.dumps([settings, content], sort_keys=True)
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read the complete records of a record file."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("\n"):
                yield json.loads(line)


def atomic_write(path: str | Path, write: Any) -> Path:
    """Write a file through a temporary sibling and rename, so no half-written file is left.

    Args:
        path: Destination.
        write: Callable taking the temporary path and writing the content there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def pack_array(array: Any) -> dict[str, Any]:
    """Encode a float32/int array compactly for a JSON record (base64 of the raw bytes)."""
    import base64

    import numpy as np

    arr = np.ascontiguousarray(array)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    return {
        "dtype": str(arr.dtype),
        "shape": list(arr.shape),
        "b64": base64.b64encode(arr.tobytes()).decode(),
    }


def unpack_array(packed: dict[str, Any]) -> Any:
    """Inverse of :func:`pack_array`."""
    import base64

    import numpy as np

    raw = base64.b64decode(packed["b64"])
    return np.frombuffer(raw, dtype=packed["dtype"]).reshape(packed["shape"]).copy()


def write_tables(out_dir: str | Path, tables: Mapping[str, Any]) -> list[Path]:
    """Write each DataFrame as ``<out_dir>/<name>.csv``, atomically; returns the paths."""
    out = Path(out_dir)
    return [
        atomic_write(out / f"{name}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False))
        for name, frame in tables.items()
    ]
