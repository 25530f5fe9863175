"""Errors a user can fix: the CLI prints their message on one line, without a traceback; and how it words
any other exception, and a library message's parameters, on that line."""

import os
import re
import sys


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


_RAISING = {"on": False}


def _interrupt(signum: int, frame: object) -> None:
    if _RAISING["on"]:
        raise KeyboardInterrupt
    # Start-up: extension modules (torch, tokenizers) are still importing, and an exception raised inside
    # their C++ callbacks aborts the process (pybind11 terminates on it). Nothing is written yet: leave.
    print("interrupted", file=sys.stderr)
    exit_interrupted()


def interrupts_raise() -> None:
    """From now on Ctrl-C and SIGTERM raise KeyboardInterrupt, so temporary files are removed and an
    interrupted calibration says how to resume. Called once a model is loaded or an output is written."""
    _RAISING["on"] = True


def exit_interrupted() -> None:
    """Exit 130 now. A normal exit would not do: CPython ends the process by SIGINT instead when a
    KeyboardInterrupt once escaped C code that ran Python (as extension modules do while they are
    imported), even though the CLI caught it later."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(INTERRUPTED_EXIT)


def raise_on_signals() -> None:
    """Handle SIGINT and SIGTERM as Ctrl-C, so temporary files are removed on the way out and the
    command exits 130. Both are set explicitly: a shell starts background jobs with SIGINT ignored."""
    import signal

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


PACKAGES = {"PIL": "pillow", "yaml": "pyyaml"}


def describe(error: Exception) -> str:
    """One line for an exception from a library: the common ones say what to do; anything else is a bug."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        module = error.name.split(".")[0]
        package = PACKAGES.get(module, module.replace("_", "-"))
        return f"this needs the Python package '{package}', which is not installed: pip install {package}"
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return ("out of memory: lower --height, --width, --frames or --batch-size, or use --offload on a GPU")
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}; check the path, its permissions and the free space"
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message} (unexpected: run with --debug for the traceback, and report it)"


LIBRARY_PARAMETERS = ("budget", "gamma", "cost", "kmax", "max_skip", "lambdas", "holdout", "max_runs", "runs", "steps")


def as_flags(message: str) -> str:
    """A library error names its parameters (`budget=12`); on the command line they are flags (`--budget 12`)."""
    pattern = rf"\b({'|'.join(LIBRARY_PARAMETERS)})=('?)([^\s']*)\2"
    return re.sub(pattern, lambda m: f"--{m[1].replace('_', '-')} {m[3]}", message)
