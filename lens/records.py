"""Per-sample result files that survive interruption: each record is written once, never twice.

A run appends one JSON line per finished sample and flushes it to disk. On resume the file is
read back; a torn last line (the process died mid-write) is cut off, and samples whose ids are
already present are skipped. Every later analysis (drift, interventions, replay, evaluation) uses
this one writer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lens.errors import ConfigError, DatasetError


class RecordWriter:
    """Append-only JSONL of per-sample records, keyed by ``sample_id``.

    Args:
        path: The JSONL file.
        resume: Keep existing records and skip their samples; otherwise start afresh.
        settings: What the records depend on (model names, config). Stored beside the records
            (``<name>.settings.json``); resuming with different settings is refused, because the
            old records would silently be mixed with new ones.

    Raises:
        ConfigError: On resume, when ``settings`` differ from the stored ones.
    """

    def __init__(self, path: str | Path, resume: bool = True, settings: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.settings_path = self.path.with_name(self.path.stem + ".settings.json")
        self.done: set[str] = set()
        wanted = None if settings is None else json.loads(json.dumps(settings, sort_keys=True, default=str))
        if self.path.exists() and resume:
            if wanted is not None and self.settings_path.exists():
                stored = json.loads(self.settings_path.read_text())
                if stored != wanted:
                    changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
                    raise ConfigError(
                        f"{self.path} holds records made with other settings ({', '.join(changed)}); "
                        "rerun with --no-resume or use another output folder"
                    )
            self._recover()
        elif self.path.exists():
            self.path.unlink()
        if wanted is not None:
            atomic_write(self.settings_path, lambda tmp: Path(tmp).write_text(json.dumps(wanted, indent=1)))

    def _recover(self) -> None:
        raw = self.path.read_bytes()
        good = raw.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if good != len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
        for lineno, line in enumerate(raw[:good].splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{self.path}:{lineno}: corrupt record ({exc.msg})") from exc
            self.done.add(str(record["sample_id"]))

    def __contains__(self, sample_id: str) -> bool:
        return str(sample_id) in self.done

    def write(self, sample_id: str, record: dict[str, Any]) -> None:
        """Append one sample's record and make it durable before returning."""
        sample_id = str(sample_id)
        if sample_id in self.done:
            raise ValueError(f"sample {sample_id!r} was already written")
        line = json.dumps({"sample_id": sample_id, **record}, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.done.add(sample_id)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter_records(self.path)

    def read(self, sample_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The records of ``sample_ids`` (in file order), e.g. this run's subset of a larger file."""
        wanted = {str(i) for i in sample_ids}
        return [r for r in iter_records(self.path) if r["sample_id"] in wanted]


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
