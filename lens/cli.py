"""The ``lens`` command line. Bad input gets one line on stderr and exit 2, no traceback.

:func:`main` is the one error boundary: replay-lens's own errors, and the operating-system and
library failures a user can cause or fix (a full disk, a read-only or misplaced ``--out``, a
truncated ``model.safetensors``, a file that is not UTF-8, a CUDA device that is not there), become
one line naming the problem. ``lens --debug COMMAND`` (or ``lens COMMAND --debug``) also prints the
traceback. Ctrl-C exits 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
import traceback
from collections.abc import Sequence

from lens.errors import ReplayLensError

#: Subcommand modules under lens.commands; each defines ``register(subparsers)``.
COMMANDS = (
    "drift",
    "eval",
    "intervene",
    "replay",
    "perturb",
    "merge",
    "plot",
    "export",
    "organism",
    "reproduce",
    "pti",
    "plant",
    "agent",
)

_OS_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a file is where a folder should be",
    errno.EISDIR: "a folder is where a file should be",
    errno.EEXIST: "already exists",
    errno.EFBIG: "file too large",
}
_CUDA = re.compile(r"CUDA|cuda|NVIDIA|nvidia|cudnn|NCCL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens",
        description="replay-lens: logit-lens drift, interventions and Activation Replay for base/RLVR pairs.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"lens.commands.{name}").register(subparsers)
    for sub in subparsers.choices.values():
        # SUPPRESS: an absent subcommand flag does not override ``lens --debug COMMAND``.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _filenames(exc: OSError) -> str:
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return " -> ".join(names)


def _is_safetensors_error(exc: BaseException) -> bool:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return False
    return isinstance(exc, SafetensorError)


def describe_error(exc: BaseException) -> str | None:
    """One line for an error the user can fix, or ``None`` for a bug (which keeps its traceback)."""
    if isinstance(exc, ReplayLensError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not valid UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, OSError):
        what = _OS_ERRORS.get(exc.errno or -1) or exc.strerror or str(exc) or type(exc).__name__
        if exc.errno == errno.EEXIST and exc.filename and os.path.isfile(exc.filename):
            what = _OS_ERRORS[errno.ENOTDIR]  # mkdir(parents=True) met a file on the way
        where = _filenames(exc)
        return f"{what}: {where}" if where else what
    if _is_safetensors_error(exc):
        return f"corrupt or truncated safetensors file: {exc}"
    if isinstance(exc, (AssertionError, RuntimeError)) and _CUDA.search(str(exc)):
        return f"CUDA is not usable: {str(exc).strip().splitlines()[0]}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lens`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"lens {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # the one boundary; bugs are re-raised below
        message = describe_error(exc)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"lens {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
