"""Errors that are the user's to fix: main.py prints them as one line (exit 2) instead of a traceback.

This module imports nothing of the project, so any module may raise these without an import cycle. Anything
that is not a `UserError` is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, files or environment that the message tells how to fix."""


class UsageError(UserError, ValueError):
    """A flag, config value or argument out of range, or two that contradict each other."""
