"""Errors that are the user's to fix: main.py prints them as one line (exit 2) instead of a traceback.

This module imports nothing of the project, so any module may raise these without an import cycle. Anything
that is not a `UserError` is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, files or environment that the message tells how to fix."""


class UsageError(UserError, ValueError):
    """A flag, config value or argument out of range, or two that contradict each other."""


class ParamFileError(UserError, ValueError):
    """A parameter file that does not exist, is corrupt, or does not fit the model or the requested config."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message of what was saved and how to continue; main.py prints it and exits 130."""
