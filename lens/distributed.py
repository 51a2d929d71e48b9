"""Data-parallel runs: each process computes a shard of the records, one process merges them.

Two ways to split a run:

* under ``torchrun`` or ``accelerate launch`` (``RANK`` and ``WORLD_SIZE`` in the environment), rank
  ``r`` of ``N`` loads its own pair (on ``cuda:LOCAL_RANK`` when ``--device cuda``) and computes the
  run's records ``r, r+N, …``; all ranks meet at a barrier (``torch.distributed``, gloo), and rank 0
  merges the shards and writes the tables and figures;
* ``--shard i/N`` does the same without ``torch.distributed``, for a cluster's job array: each job
  computes its shard, and the last one to finish merges (``lens merge OUT`` does it by hand).

A shard writes into its own folder, ``OUT/shards/<i>-of-<N>/``, with its own lock, record log and
Parquet files, and a manifest (``shard.json``) naming the run's record keys and their input
digests. Records already in ``OUT/records.jsonl`` (an earlier single-process run or merge) are not
recomputed. An interrupted shard resumes alone: rerun the same command with the same shard.

:func:`merge` checks that every shard ran the same settings, models and data (refusing, with the
shard named, otherwise), writes one log in the run's order into ``OUT`` (hard-linking the Parquet
files), and only then removes the shard folders. A key is taken from exactly one place: its shard,
else the main log; so a record is never lost, mixed or counted twice, also when a merge is
interrupted and run again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from lens.errors import ConfigError, DatasetError, OutputError

#: Folder of the shard folders inside ``--out``.
SHARDS = "shards"
#: A shard's manifest file.
MANIFEST = "shard.json"
_SHARD_NAME = re.compile(r"^(\d+)-of-(\d+)$")
_LOG = "records.jsonl"
_KEPT = "merge refused, the shards' records are kept: rerun the odd shard with the others' options"


@dataclass(frozen=True)
class Shard:
    """One process's part of a run.

    Attributes:
        index: This shard, ``0..count-1``.
        count: Number of shards.
        launcher: ``"torchrun"`` (also ``accelerate launch``: both set ``RANK``/``WORLD_SIZE``) or
            ``"--shard"``.
        local_rank: The process's index on its machine (picks its GPU), under a launcher.
    """

    index: int
    count: int
    launcher: str = "--shard"
    local_rank: int | None = None
    _positions: dict[int, dict[str, int]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"--shard {self.index}/{self.count}: the shard must be in 0..count-1")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    @property
    def launched(self) -> bool:
        """Whether the processes were started by a launcher (and meet at a barrier)."""
        return self.launcher != "--shard"

    def folder(self, out: str | Path) -> Path:
        """This shard's folder inside ``out``."""
        return Path(out) / SHARDS / self.name

    def owns_key(self, key: str, keys: Mapping[str, Any]) -> bool:
        """Whether ``key``, at position ``p`` of the run's ordered ``keys``, is this shard's:
        ``p % count == index``. A key outside ``keys`` is shard 0's."""
        positions = self._positions.get(id(keys))
        if positions is None:
            positions = {k: i for i, k in enumerate(keys)}
            self._positions.clear()
            self._positions[id(keys)] = positions
        return positions.get(str(key), 0) % self.count == self.index

    def write_manifest(self, folder: Path, keys: Mapping[str, str], fresh: bool) -> None:
        """Store the run's keys (with their input digests) and whether it discards the main log."""
        import sys

        from lens.records import atomic_write

        command = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
        manifest = {"index": self.index, "count": self.count, "fresh": fresh, "command": command}
        text = json.dumps({**manifest, "keys": dict(keys)})
        atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def device(self, device: str | None) -> str | None:
        """The device of this process: ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher."""
        if device in ("cuda", "xpu") and self.local_rank is not None:
            return f"{device}:{self.local_rank}"
        return device


def parse_shard(text: str) -> Shard:
    """``"i/N"`` to a :class:`Shard`.

    Raises:
        ConfigError: Not of that form, or ``i`` outside ``0..N-1``.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if match is None:
        raise ConfigError(f"--shard {text!r}: use i/N, e.g. --shard 0/4 for the first of four shards")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ConfigError(f"--shard {text}: the shard index must be in 0..{max(count - 1, 0)}")
    return Shard(index, count)


def from_environment(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard of a process started by ``torchrun``/``accelerate launch``, or ``None``.

    Raises:
        ConfigError: ``RANK``/``WORLD_SIZE`` that are not integers.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ConfigError(
            f"RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r} are not integers"
        ) from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    return Shard(rank, world, "torchrun", local)


def resolve(option: str | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard of this process, from ``--shard`` or the launcher's environment.

    Raises:
        ConfigError: A malformed ``--shard``, or ``--shard`` under a launcher (one split only).
    """
    launched = from_environment(environ)
    if option is None:
        return launched
    if launched is not None:
        raise ConfigError(
            f"--shard {option} under torchrun/accelerate (WORLD_SIZE={launched.count}): the launcher "
            "already splits the run; drop --shard"
        )
    shard = parse_shard(option)
    return None if shard.count == 1 else shard


def shard_folders(out: str | Path) -> list[tuple[Shard, Path]]:
    """The shard folders in ``out``, by index."""
    root = Path(out) / SHARDS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _SHARD_NAME.match(path.name)
        if match and path.is_dir():
            found.append((Shard(int(match.group(1)), int(match.group(2))), path))
    return sorted(found, key=lambda item: (item[0].count, item[0].index))


def check_out(out: str | Path, shard: Shard) -> None:
    """Refuse a sharded run into a folder that holds unmerged shards of another split.

    Raises:
        ConfigError: ``out/shards`` holds shards of another count.
    """
    other = sorted({s.count for s, _ in shard_folders(out)} - {shard.count})
    if other:
        raise ConfigError(
            f"{out} holds unmerged shards of a {other[0]}-way run ({Path(out) / SHARDS}); merge them "
            f"with `lens merge {out}` first, or use --shard i/{other[0]}"
        )


# -- merging ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge` did.

    Attributes:
        shards: The shard folders merged.
        merged: Records taken from the shards.
        kept: Records kept from the main log.
        missing: Keys of the run that no shard and no main record holds (an unfinished shard).
        keys: All keys of the run, in its order.
        command: The command line of a shard, without ``--shard`` (it draws the merged tables).
    """

    shards: tuple[str, ...]
    merged: int
    kept: int
    missing: tuple[str, ...]
    keys: tuple[str, ...] = ()
    command: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.missing


def _manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("keys"), dict):
            raise ValueError("no keys")
    except (ValueError, AttributeError) as exc:
        raise DatasetError(f"{path} is not a shard manifest ({exc})") from None
    return manifest


def _read_shards(out: Path) -> tuple[list[tuple[Shard, Path, dict[str, Any]]], dict[str, Any]]:
    """Shards with records, and the run they agree on (settings, fingerprint, keys, fresh)."""
    from lens.fingerprint import describe_changes
    from lens.records import changed_settings, read_settings, settings_path

    found = shard_folders(out)
    if not found:
        raise DatasetError(f"{out} has no shards to merge ({out / SHARDS} is missing or empty)")
    counts = sorted({s.count for s, _ in found})
    if len(counts) > 1:
        raise ConfigError(
            f"{out / SHARDS} holds shards of {' and '.join(map(str, counts))}-way runs; each merge takes "
            "one split: remove the folders of the split you abandoned"
        )
    shards, run = [], None
    for shard, folder in found:
        manifest = _manifest(folder)
        if manifest is None or not (folder / _LOG).is_file():
            continue  # a shard that wrote nothing yet
        settings, fingerprint = read_settings(settings_path(folder / _LOG))
        mine = {
            "settings": settings,
            "fingerprint": fingerprint,
            "keys": manifest["keys"],
            "fresh": bool(manifest.get("fresh")),
        }
        if run is None:
            run, first = mine, folder
        else:
            if mine["settings"] != run["settings"]:
                changed = changed_settings(run["settings"], mine["settings"])
                raise ConfigError(
                    f"{folder} ran with other settings than {first} ({', '.join(changed)}); {_KEPT}"
                )
            changes = describe_changes(run["fingerprint"] or {}, mine["fingerprint"] or {})
            if changes:
                raise ConfigError(f"{folder} ran other models than {first}: {'; '.join(changes)}; {_KEPT}")
            if mine["keys"] != run["keys"]:
                raise ConfigError(
                    f"{folder} ran other data than {first} (its samples or their inputs differ); {_KEPT}"
                )
            if mine["fresh"] != run["fresh"]:
                raise ConfigError(f"{folder} and {first} disagree on --no-resume; {_KEPT}")
        shards.append((shard, folder, manifest))
    if run is None:
        raise DatasetError(f"no shard in {out / SHARDS} has finished a record yet")
    return shards, run


def _unsharded(manifest: dict[str, Any]) -> tuple[str, ...]:
    """A shard's command line without its ``--shard`` option."""
    command = [str(part) for part in manifest.get("command") or []]
    out: list[str] = []
    skip = False
    for part in command:
        if skip:
            skip = False
        elif part == "--shard":
            skip = True
        elif not part.startswith("--shard="):
            out.append(part)
    return tuple(out)


def _link(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (no copy of the data), or copy where links are impossible."""
    if target.exists():
        if os.path.samefile(source, target):
            return
        raise OutputError(f"{target} exists and differs from {source}; merge refused")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        from lens.records import atomic_write

        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def merge(out: str | Path, require_complete: bool = False) -> MergeReport:
    """Merge the shards in ``out`` into its record log, then remove them.

    Args:
        out: The run's ``--out`` folder.
        require_complete: Merge only when every key of the run has a record (the last shard of a
            job array to finish merges; the others find the run incomplete and leave it).

    Returns:
        What was merged; with ``require_complete`` and an incomplete run, nothing was changed.

    Raises:
        DatasetError: No shard to merge.
        ConfigError: Shards (or the main log) made with other settings, models or data.
        OutputError: A shard is still running, or ``out`` is in use.
    """
    from lens import outdir
    from lens.records import RecordLog, atomic_write, write_settings
    from lens.tables import PAYLOAD

    out = Path(out)
    outdir.check_writable(out, "OUT")
    claimed: list[Path] = []
    try:
        outdir.claim(out)
        claimed.append(out)
        for _, folder in shard_folders(out):
            outdir.claim(folder)  # refuses a shard that is still running
            claimed.append(folder)
        shards, run = _read_shards(out)
        keys = run["keys"]
        logs = [
            (folder, RecordLog(folder / _LOG, run["settings"], run["fingerprint"], keys))
            for _, folder, _ in shards
        ]
        main = None
        if not run["fresh"] and (out / _LOG).exists():
            main = RecordLog(out / _LOG, run["settings"], run["fingerprint"], keys)
        taken: dict[str, tuple[Path | None, dict[str, Any]]] = {}
        for folder, log in logs:
            for key, record in log.lines().items():
                if key in taken:
                    raise DatasetError(f"{folder} and {taken[key][0]} both hold a record of {key!r}")
                taken[key] = (folder, record)
        merged = len(taken)
        kept = 0
        main_lines = main.lines() if main is not None else {}
        for key, record in main_lines.items():
            if key not in taken:
                taken[key] = (None, record)
                kept += 1
        missing = tuple(k for k in keys if k not in taken)
        report = MergeReport(
            tuple(str(f) for _, f, _ in shards), merged, kept, missing, tuple(keys), _unsharded(shards[0][2])
        )
        if require_complete and missing:
            return report
        order = {key: i for i, key in enumerate(keys)}
        ordered = sorted(taken.items(), key=lambda item: order.get(item[0], len(order)))
        referenced: set[str] = set()
        for _, (folder, record) in ordered:
            pointer = record.get(PAYLOAD)
            if isinstance(pointer, dict) and "file" in pointer:
                referenced.add(pointer["file"])
                if folder is not None:
                    _link(folder / pointer["file"], out / pointer["file"])
        lines = b"".join(
            (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8") for _, (_, record) in ordered
        )

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                fh.write(lines)
                fh.flush()
                os.fsync(fh.fileno())

        write_settings(out / "records.settings.json", run["settings"], run["fingerprint"])
        atomic_write(out / _LOG, write)
        # The main log is durable: the shards' records are in it, so their folders can go.
        for _, folder in shard_folders(out):
            shutil.rmtree(folder)
        _remove_orphans(out, referenced)
        return report
    finally:
        for folder in reversed(claimed):
            outdir.release(folder)
        root = out / SHARDS
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()


def _remove_orphans(out: Path, referenced: set[str]) -> None:
    """Remove the main folder's Parquet files no line points at (the main log was just replaced)."""
    from lens.tables import SHARD_GLOB, shard_folder

    folder = shard_folder(out / _LOG)
    if not folder.is_dir():
        return
    for path in folder.glob(SHARD_GLOB):
        if path.relative_to(out).as_posix() not in referenced:
            path.unlink()


# -- finishing a sharded run ----------------------------------------------------------------------------


def barrier(shard: Shard, timeout_hours: float = 72.0) -> None:
    """Wait for every process of a launched run (gloo: no GPU needed for the rendezvous)."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=timedelta(hours=timeout_hours))
    try:
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


def finish(out: str | Path, shard: Shard) -> MergeReport | None:
    """After this shard's records are written: merge, if this process is the one to.

    Under a launcher, every rank waits at a barrier and rank 0 merges. With ``--shard``, the shard
    that finds every record done merges; a shard finding others unfinished or running leaves it.

    Returns:
        The merge report when this process merged (the run's tables are then to be drawn), else
        ``None``.
    """
    if shard.launched:
        barrier(shard)
        if shard.index != 0:
            return None
        return merge(out)
    try:
        report = merge(out, require_complete=True)
    except OutputError:
        return None  # another shard is still running (or merging)
    except DatasetError:
        if not shard_folders(out):
            return None  # merged by another shard already
        raise
    return report if report.complete else None
