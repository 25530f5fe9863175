"""Running the `meancache` command in-process (fast) or as a real subprocess (pipes, signals)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from meancache_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> Result:
    """`meancache ARGS` in this process; the exit code comes from SystemExit (0 when main returns)."""
    capsys.readouterr()
    old_argv = sys.argv
    sys.argv = ["meancache", *args]
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv = old_argv
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def run_process(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """`meancache ARGS` as a subprocess of the same interpreter."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "meancache_cli", *args], input=stdin, capture_output=True,
                          env=env, cwd=ROOT, timeout=600)
