"""`python -m meancache_cli` and the `meancache` command.

Ctrl-C and SIGTERM are handled before the CLI is even imported, so a run stopped during start-up
exits 130 with one line, like a run stopped later.
"""

import sys

from .errors import INTERRUPTED_EXIT, exit_interrupted, raise_on_signals


def run() -> None:
    raise_on_signals()
    try:
        from .cli import main

        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        exit_interrupted()
    except SystemExit as done:
        if done.code == INTERRUPTED_EXIT:
            exit_interrupted()
        raise


if __name__ == "__main__":
    run()
