"""User-facing errors.

Every mistake a user can cause (a path, a band count, a config combination) is raised as
`ConfigError` or `DataError` with one sentence naming the file or key and the fix; the task
entry points print that sentence without a traceback and exit with status 2.
"""

from __future__ import annotations


class SegplatError(Exception):
    """Base class for errors a user can fix; the message is one sentence."""


class ConfigError(SegplatError):
    """An impossible or missing configuration value."""


class DataError(SegplatError):
    """Input data that cannot be read as the configured dataset."""


class CheckpointError(SegplatError):
    """A checkpoint that is missing or does not match the configured run."""
