"""Output folders: refuse unusable ones up front, and let one run at a time write into each.

The lock is an OS lock (``fcntl.flock``) on ``<folder>/.lens.lock``: the kernel drops it when the
process dies, so a crashed run never blocks the next one. The file names the holder (pid and command
line) for the refusal message. Within one process the lock is re-entrant (a command and the record
writer it creates both claim the folder). When the last claim is released the lock file is removed,
and so is the folder if this run created it and left it empty: a run refused or failed before its
first result leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

from lens.errors import OutputError

LOCK_NAME = ".lens.lock"


def check_writable(path: str | Path, option: str = "--out") -> Path:
    """Refuse an output folder that cannot be created or written, before any work starts.

    Args:
        path: The folder (it need not exist yet).
        option: The option's name for the message.

    Raises:
        OutputError: ``path`` is an existing file, lies under a file, or its nearest existing folder
            is read-only or not writable.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is an existing file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{option} {path}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "read-only" if _read_only_fs(existing) else "not writable"
        raise OutputError(f"{option} {path}: {existing} is {what}")
    return path


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class _Held:
    def __init__(self, fd: int, lock_path: Path, created: list[Path]) -> None:
        self.fd = fd
        self.lock_path = lock_path
        self.created = created  # folders this claim created, deepest first
        self.count = 1


_HELD: dict[Path, _Held] = {}
_GUARD = threading.Lock()


def _describe_holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "another process"
    pid, _, command = text.partition("\n")
    if not pid.strip():
        return "another process"
    return f"process {pid.strip()}" + (f" ({command.strip()})" if command.strip() else "")


def _make_folders(folder: Path) -> list[Path]:
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing  # deepest first


def claim(folder: str | Path) -> Path:
    """Take the folder's lock for this process (re-entrant); create the folder if needed.

    Raises:
        OutputError: Another process holds the lock (the message names it).
    """
    import fcntl

    folder = Path(folder).expanduser()
    key = folder.resolve()
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held.count += 1
            return folder
        created = _make_folders(folder)
        lock_path = folder / LOCK_NAME
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                _remove_created(created)
                raise OutputError(
                    f"{folder} is in use by {_describe_holder(lock_path)}; wait for it to finish or use "
                    "another --out"
                ) from None
            # The previous holder may have removed the file between our open and our lock: retry.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{' '.join(sys.argv)}\n".encode())
        _HELD[key] = _Held(fd, lock_path, created)
    return folder


def release(folder: str | Path) -> None:
    """Drop one claim; the last one unlocks, removes the lock file and any folder the claim left empty."""
    key = Path(folder).expanduser().resolve()
    with _GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[key]
        try:
            held.lock_path.unlink(missing_ok=True)  # while still locked, so no one else holds it
        finally:
            os.close(held.fd)
        _remove_created(held.created)


def _remove_created(created: list[Path]) -> None:
    for path in created:
        try:
            path.rmdir()  # only succeeds when empty: results are never removed
        except OSError:
            break


class OutputFolder:
    """Context manager: check ``folder`` is writable, claim it, release it on exit.

    Example:
        >>> with OutputFolder("runs/drift"):  # doctest: +SKIP
        ...     run_drift(pair, samples, "runs/drift")
    """

    def __init__(self, folder: str | Path, option: str = "--out") -> None:
        self.folder = check_writable(folder, option)

    def __enter__(self) -> Path:
        return claim(self.folder)

    def __exit__(self, *exc: object) -> None:
        release(self.folder)
