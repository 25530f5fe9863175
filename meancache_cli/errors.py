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


INTERRUPTED_EXIT = 130


class Interrupted(MeanCacheError):
    """Ctrl-C or SIGTERM, with what was kept and how to continue."""

    exit_code = INTERRUPTED_EXIT


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def raise_on_signals() -> None:
    """Handle SIGINT and SIGTERM as Ctrl-C, so temporary files are removed on the way out and the
    command exits 130. Both are set explicitly: a shell starts background jobs with SIGINT ignored."""
    import signal

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
