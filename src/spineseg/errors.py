"""One root for every error a user can cause: the CLI prints a `SpinesegError` as one line (exit 2).

Anything else is a bug and keeps its traceback. The subclasses also derive from the built-in
exception a Python caller would expect (ValueError for bad input, RuntimeError for a bad state).
"""

from __future__ import annotations


class SpinesegError(Exception):
    """Bad input or an unusable environment; the message names the file, key or parameter at fault."""


class ConfigError(SpinesegError, ValueError):
    """A profile, an override or a command-line option is wrong."""


class DatasetError(SpinesegError, ValueError):
    """A dataset file, folder or manifest is wrong."""


class ModelError(SpinesegError, ValueError):
    """An unknown encoder or architecture, or an encoder weights file that does not fit."""


class WeightsUnavailable(SpinesegError, RuntimeError):
    """ImageNet weights are neither cached nor downloadable."""


class StageOrderError(SpinesegError, RuntimeError):
    """A stage needs an artifact that an earlier stage writes."""


class NotebookFailed(SpinesegError, RuntimeError):
    """A stage notebook raised; the message names the rendered notebook and the error."""
