"""Typed exceptions. Every user-facing failure is one of these, so the CLI can print one line."""

from __future__ import annotations


class ReplayLensError(Exception):
    """Base class for every error replay-lens raises on bad input."""


class CheckpointError(ReplayLensError):
    """A checkpoint folder is missing or cannot be loaded."""


class UnsupportedArchitectureError(ReplayLensError):
    """The checkpoint's architecture has no adapter."""


class PairMismatchError(ReplayLensError):
    """The base and RLVR models cannot be compared position by position."""


class InputError(ReplayLensError):
    """An image, prompt or other per-sample input is unusable."""


class DatasetError(ReplayLensError):
    """A dataset file is malformed or empty."""


class ConfigError(ReplayLensError, ValueError):
    """A parameter is outside its valid range."""


class OutputError(ReplayLensError):
    """The output folder cannot be used: a file, not writable, or in use by another run."""
