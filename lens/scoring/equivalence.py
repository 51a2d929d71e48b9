"""Mathematical equality through math-verify, gold first, safe in any thread.

math-verify bounds its work with ``signal.alarm``, which only works in the main thread. In the main
thread (POSIX) it runs in process with that limit. In any other thread the comparison runs in one
long-lived helper process without signals, and a comparison that outlives the limit is killed with that
process: short answers such as ``9^{9^{9^9}}`` otherwise keep sympy busy for good.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from lens.errors import ConfigError
from lens.scoring.extraction import TEXT_WRAPPER, WORD, normalise, unwrap_math

logger = logging.getLogger(__name__)

MATH_TIMEOUT_S = 5
"""Time limit in whole seconds. In the main thread it is math-verify's own limit on each parse and each
comparison; in other threads it bounds the whole comparison in the helper process."""
MAX_MATH_CHARS = 1000
"""Longer extracted answers are compared as strings only: no real final answer is that long."""


def _math_source(text: str) -> str:
    """The text as math-verify should read it: inside ``$…$`` unless it already carries delimiters."""
    if any(mark in text for mark in ("$", "\\(", "\\[", "\\boxed")):
        return text
    # A bare % would start a LaTeX comment inside $…$.
    return "$" + re.sub(r"(?<!\\)%", r"\\%", text) + "$"


_GOLD_CACHE: dict[tuple[str, int], list[Any]] = {}
_GOLD_CACHE_SIZE = 4096


def _parsed_gold(source: str, timeout_s: int) -> list[Any]:
    """math-verify's parse of a gold answer, cached (a dataset repeats few golds many times)."""
    key = (source, timeout_s)
    if key not in _GOLD_CACHE:
        parse, _ = _math_verify()
        parsed = parse(source, parsing_timeout=timeout_s)
        if not parsed:
            return parsed  # a timed-out parse is not remembered: the next call tries again
        if len(_GOLD_CACHE) >= _GOLD_CACHE_SIZE:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[key] = parsed
    return _GOLD_CACHE[key]


def _math_verify() -> tuple[Callable[..., Any], Callable[..., Any]]:
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise ConfigError(
            f"the math verifier needs math-verify ({exc}); pip install 'math-verify[antlr4_13_2]'"
        ) from exc
    return parse, verify


def _verify_in_process(gold: str, pred: str, timeout_s: int) -> bool:
    parse, verify = _math_verify()
    gold_parsed = _parsed_gold(gold, timeout_s)
    pred_parsed = parse(pred, parsing_timeout=timeout_s)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


# The helper process imports math-verify only (not lens, which pulls in torch) and runs it without
# signals; the parent enforces the time limit by killing it.
_WORKER_SCRIPT = """
import json, logging, sys
logging.disable(logging.CRITICAL)
from math_verify import parse, verify
print("ready", flush=True)
for line in sys.stdin:
    gold, pred = json.loads(line)
    try:
        ok = bool(verify(parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None),
                         timeout_seconds=None))
    except Exception:
        ok = False
    print("true" if ok else "false", flush=True)
"""
_WORKER_START_S = 120.0


class _MathVerifyProcess:
    """One long-lived helper process that runs math-verify for threads other than the main one."""

    def __init__(self) -> None:
        self._forget()

    def _forget(self) -> None:
        """Start from no helper, owned by this process (a forked child must not share its parent's)."""
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._owner = os.getpid()
        self._lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> None:
        self._lines = queue.Queue()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
        )
        threading.Thread(target=self._pump, args=(self._proc, self._lines), daemon=True).start()
        if self._read(_WORKER_START_S) != "ready":
            self.close()
            raise ConfigError("math-verify could not start in a helper process; is math-verify installed?")

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    def _read(self, timeout_s: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def verify(self, gold: str, pred: str, timeout_s: int) -> bool | None:
        """math-verify's verdict, or ``None`` if it did not finish within ``timeout_s`` seconds."""
        if self._owner != os.getpid():
            self._forget()
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps([gold, pred]) + "\n")
                self._proc.stdin.flush()
            except OSError:  # it died since the poll above
                reply = None
            else:
                reply = self._read(timeout_s)
            if reply not in ("true", "false"):
                self.close()  # stuck or crashed: the next call starts a fresh one
                return None
            return reply == "true"

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


_HELPER = _MathVerifyProcess()
atexit.register(_HELPER.close)


def math_equal(gold: str, pred: str, timeout_s: int = MATH_TIMEOUT_S) -> bool:
    """Whether ``pred`` is mathematically equal to ``gold`` (math-verify, gold first).

    Equal normalised strings are equal without asking math-verify. A gold made of plain words is
    compared as a string only. A comparison that times out counts as wrong (and is logged).

    Args:
        gold: The gold answer (LaTeX or plain; ``$…$`` is added when it has no math delimiters).
        pred: The extracted prediction, likewise.
        timeout_s: Whole seconds, at least 1 (see :data:`MATH_TIMEOUT_S`).
    """
    if timeout_s < 1:
        raise ConfigError(f"timeout_s must be a whole number of seconds >= 1, got {timeout_s}")
    if normalise(gold) == normalise(pred):
        return True
    if _is_plain_text(gold) or len(pred) > MAX_MATH_CHARS:
        return False
    gold_src, pred_src = _math_source(gold), _math_source(pred)
    if threading.current_thread() is threading.main_thread() and os.name == "posix":
        return _verify_in_process(gold_src, pred_src, int(timeout_s))
    verdict = _HELPER.verify(gold_src, pred_src, int(timeout_s))
    if verdict is None:
        logger.warning(
            "math-verify did not finish within %s s on %r vs %r; counted as wrong", timeout_s, gold, pred
        )
    return bool(verdict)


def math_verify_version() -> str | None:
    """The installed math-verify version (record it with the scores: verdicts can change across releases)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("math-verify")
    except PackageNotFoundError:
        return None


def _is_plain_text(gold: str) -> bool:
    """A gold of words (``Yes``, ``red``, ``no solution``): no digits, no LaTeX, a word of 2+ letters."""
    text = TEXT_WRAPPER.sub(r"\1", unwrap_math(gold)).strip()
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z '\-]*", text)) and bool(WORD.search(text))
