"""The error users see: one line on stderr and exit code 2, from the CLI."""

from __future__ import annotations

import operator


class PyrovaeError(Exception):
    """A problem with the user's input or files, reported as one line without a traceback."""


class Interrupted(PyrovaeError):
    """The user stopped the work (Ctrl-C); the message says what was kept."""


class DiskFull(PyrovaeError):
    """A file could not be written for lack of space (or quota); the file it would have
    replaced is unchanged, and the message names both."""


def check_int(
    value: object, name: str, minimum: int = 1, error: type[Exception] = ValueError
) -> int:
    """``value`` as an int when it is an integer (not a bool) of at least ``minimum``; else
    raises ``error`` with one line naming ``name``: the one check of counts and sizes.

    Example:
        >>> check_int(3, "num_samples")
        3
    """
    try:
        integer = operator.index(value)  # ints and NumPy integers; not floats or strings
    except TypeError:
        integer = None
    if isinstance(value, bool) or integer is None or integer < minimum:
        raise error(f"{name} must be an integer >= {minimum}, got {value!r}")
    return integer
