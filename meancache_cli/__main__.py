"""`python -m meancache_cli` and the `meancache` command.

Ctrl-C and SIGTERM are handled before the CLI is even imported, so a run stopped during start-up
exits 130 with one line, like a run stopped later.
"""

import os
import sys

from .errors import INTERRUPTED_EXIT, raise_on_signals


def run() -> None:
    raise_on_signals()
    try:
        from .cli import main

        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _exit_interrupted()
    except SystemExit as done:
        if done.code == INTERRUPTED_EXIT:
            _exit_interrupted()
        raise


def _exit_interrupted() -> None:
    """Exit 130 now. A normal exit would not do: CPython ends the process by SIGINT instead when a
    KeyboardInterrupt once escaped C code that ran Python (as extension modules do while they are
    imported), even though the CLI caught it later."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    run()
