"""The error users see: one line on stderr and exit code 2, from the CLI."""

from __future__ import annotations


class PyrovaeError(Exception):
    """A problem with the user's input or files, reported as one line without a traceback."""


class Interrupted(PyrovaeError):
    """The user stopped the work (Ctrl-C); the message says what was kept."""
