"""What a user can fix vs what is a bug in pvae.

Every error pvae raises for something the *user* can fix — a bad argument, data of the wrong
shape or support, an unknown component name, a run directory that exists, a training run that
diverged — is a :class:`UsageError` whose message names the problem and the fix. The command
line prints a :class:`UsageError` in one line and exits with status 2; any other exception is a
bug in pvae (or in a library below it): the command line prints the traceback, asks for a
report, and exits with status 1. :class:`UsageError` subclasses :class:`ValueError`, and each
specific kind also subclasses the built-in exception it refines (``TypeError``,
``FileExistsError`` ...), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = [
    "UsageError", "UsageTypeError", "DivergenceError", "RunExistsError", "NotARunError",
    "DiskFullError",
]


class UsageError(ValueError):
    """Something the user can fix; the message says what and how."""


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong type (e.g. an integer tensor where data must be floating point)."""


class DivergenceError(UsageError, FloatingPointError):
    """Training met a NaN/inf loss or gradient (the update was never applied); lower the
    learning rate or let fit skip such steps."""


class RunExistsError(UsageError, FileExistsError):
    """The run directory already holds a run (nothing was overwritten)."""


class NotARunError(UsageError, FileNotFoundError):
    """The folder is not a pvae run directory."""


class DiskFullError(UsageError, OSError):
    """No space left where a file was being written; the previous file is intact."""


def rows_phrase(indices) -> str:
    """How every message names rows of an array or tensor: their count and the first few
    indices, counted from 0 as NumPy and PyTorch index them (a CSV file's errors name its
    *lines* instead, counted from 1 as an editor shows them)."""
    indices = [int(i) for i in indices]
    shown = ", ".join(str(i) for i in indices[:5]) + (", ..." if len(indices) > 5 else "")
    return f"{len(indices)} row(s) (row index {shown}, counting from 0)"
