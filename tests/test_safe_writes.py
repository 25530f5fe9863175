"""Outputs never replace someone else's file: links are written through, devices and FIFOs in place.

Every link, FIFO and device is made in a temporary directory: nothing outside it is touched, even by
a writer that still renamed over its target.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from cli_helpers import run_cli, run_process

from meancache_cli.errors import FileFormatError
from meancache_cli.files import write_atomic


def test_a_symlink_is_written_through_to_its_target_in_the_targets_directory(tmp_path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target = real / "schedule.yaml"
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "link.yaml"
    link.symlink_to("real/schedule.yaml")
    inode = target.stat().st_ino
    write_atomic(link, b"new")
    assert link.is_symlink() and os.readlink(link) == "real/schedule.yaml"
    assert target.read_bytes() == b"new" and target.stat().st_ino != inode  # renamed over, not rewritten
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.yaml", "real"]
    assert [p.name for p in real.iterdir()] == ["schedule.yaml"]


def test_a_chain_of_links_to_a_file_not_yet_there_creates_the_file(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "first").symlink_to(tmp_path / "second")
    (tmp_path / "second").symlink_to("d/cal.safetensors")
    write_atomic(tmp_path / "first", b"data")
    assert (tmp_path / "d" / "cal.safetensors").read_bytes() == b"data"
    assert (tmp_path / "first").is_symlink() and (tmp_path / "second").is_symlink()


def test_a_link_into_a_missing_directory_names_it(tmp_path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "gone" / "x.yaml")
    with pytest.raises(FileFormatError, match=f"the directory {tmp_path / 'gone'} does not exist"):
        write_atomic(tmp_path / "link", b"data")
    assert (tmp_path / "link").is_symlink() and not (tmp_path / "gone").exists()


def test_a_fifo_is_written_in_place(tmp_path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    write_atomic(fifo, b"through the pipe")
    reader.join(timeout=30)
    assert received == [b"through the pipe"] and stat.S_ISFIFO(fifo.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


@pytest.mark.skipif(os.geteuid() != 0, reason="making a character device (a /dev/null twin) needs root")
def test_a_character_device_is_written_in_place(tmp_path) -> None:
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    write_atomic(null, b"discarded")
    assert stat.S_ISCHR(null.lstat().st_mode) and null.stat().st_rdev == os.makedev(1, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["null"]


def test_plan_out_a_link_to_dev_stdout_writes_stdout_and_keeps_the_link(calibration, tmp_path) -> None:
    link = tmp_path / "stdout"
    link.symlink_to("/dev/stdout")  # a twin of /dev/stdout (itself a link to /proc/self/fd/1)
    result = run_process(["plan", "--calibration", calibration, "--budget", "4", "--out", str(link)])
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(b"format_version: 3\nkind: meancache-schedule")
    assert b"compute steps:" in result.stderr and b"compute steps:" not in result.stdout
    assert link.is_symlink() and os.readlink(link) == "/dev/stdout"
    json_too = run_process(["plan", "--calibration", calibration, "--budget", "4", "--out", str(link), "--json"])
    assert json_too.returncode == 2 and b"both write to stdout" in json_too.stderr and json_too.stdout == b""


def test_plan_through_a_link_and_onto_a_device(calibration, tmp_path, capsys) -> None:
    (tmp_path / "plans").mkdir()
    link = tmp_path / "current.yaml"
    link.symlink_to("plans/b4.yaml")
    result = run_cli(["plan", "--calibration", calibration, "--budget", "4", "--out", str(link)], capsys)
    assert result.code == 0, result.stderr
    assert link.is_symlink() and (tmp_path / "plans" / "b4.yaml").read_text().startswith("format_version: 3")
    missing = tmp_path / "elsewhere.yaml"
    missing.symlink_to("nowhere/b4.yaml")
    refused = run_cli(["plan", "--calibration", calibration, "--budget", "4", "--out", str(missing)], capsys)
    assert refused.code == 2
    assert refused.stderr.strip() == (f"error: --out {missing}: the directory {tmp_path / 'nowhere'} does not exist "
                                      f"({missing} links to {tmp_path / 'nowhere' / 'b4.yaml'}); create it first")
    if os.geteuid() == 0:
        null = tmp_path / "null"
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        assert run_cli(["plan", "--calibration", calibration, "--budget", "4", "--out", str(null)], capsys).code == 0
        assert stat.S_ISCHR(null.lstat().st_mode)


def test_output_messages_say_what_is_wrong(model_dir, tmp_path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [
        (["--out", str(tmp_path)], f"--out {tmp_path} is a directory; give a file name such as {tmp_path}/out.png"),
        (["--out", str(afile / "x.png")], f"--out {afile}/x.png: {afile} is a file, not a directory"),
        (["--out", str(afile / "sub" / "x.png")], f"--out {afile}/sub/x.png: {afile} is a file, not a directory"),
        (["--out", str(tmp_path / "noext")], f"--out {tmp_path}/noext has no extension to name the image type"),
    ]
    for args, message in cases:
        result = run_cli(["generate", "--model", model_dir, "--prompt", "x", "--no-cache", *args], capsys)
        assert result.code == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
        assert len(result.stderr.splitlines()) == 1
    plot = run_cli(["inspect", str(afile), "--plot", str(tmp_path / "no" / "map.png")], capsys)
    assert plot.code == 2 and plot.stderr.startswith(f"error: --plot {tmp_path}/no/map.png: the directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and Path(afile).read_text() == ""
