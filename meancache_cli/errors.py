"""Errors a user can fix: the CLI prints their message on one line, without a traceback."""


class MeanCacheError(Exception):
    """Bad input or a failed run, with a message that names the problem and the fix."""

    exit_code = 1


class UsageError(MeanCacheError):
    """The command line itself is wrong (a value out of range, a missing option)."""

    exit_code = 2


class FileFormatError(MeanCacheError):
    """A calibration or schedule file that is missing, unreadable, of the wrong kind or corrupted."""


class ScheduleMismatchError(MeanCacheError):
    """A schedule planned for another model or another number of steps than this run."""
