"""User-facing errors. run.py prints these as one line (no traceback) unless debug is on."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, of the wrong type, or impossible for this pair/task."""


class DataFileError(UserError, ValueError):
    """A task data file is missing or malformed; the message names the file and line."""


class NonFiniteLossError(UserError, RuntimeError):
    """A loss term became NaN or Inf; the message names the term and the step."""
