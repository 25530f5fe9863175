"""Every bad input: a one-line error, the documented exit code, no traceback, nothing written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import ROOT, run_cli

from meancache_cli.files import load_calibration, save_calibration

SIZE = ["--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def files(calibration, model_dir, tmp_path_factory) -> dict[str, str]:
    """Good and bad inputs, built once."""
    from cli_helpers import run_process

    root = tmp_path_factory.mktemp("inputs")
    schedule = root / "schedule.yaml"
    planned = run_process(["plan", "--calibration", calibration, "--budget", "4", "--out", str(schedule)])
    assert planned.returncode == 0
    raw = Path(calibration).read_bytes()
    (root / "truncated.safetensors").write_bytes(raw[: len(raw) // 3])
    (root / "garbage.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    (root / "empty.txt").write_text("\n# only a comment\n")
    for part, text in (("model_index.json", "{not json"), ("transformer/config.json", "[]")):
        broken = root / f"broken-{part.split('/')[0].split('.')[0]}"
        (broken / part).parent.mkdir(parents=True)
        (broken / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
        (broken / part).write_text(text)
    (root / "latin1.txt").write_bytes("a red circle on a caf\xe9 background\n".encode("latin-1"))
    (root / "v4.yaml").write_text(schedule.read_text().replace("format_version: 3", "format_version: 4"))
    (root / "other-model.yaml").write_text(schedule.read_text().replace(f"model: {model_dir}", "model: demo"))
    bad = load_calibration(calibration)
    bad.errors.jvp[1, 0, 2, 5] = np.nan
    save_calibration(bad, root / "nan.safetensors")
    bad.errors.jvp[1, 0, 2, 5] = np.inf
    save_calibration(bad, root / "inf.safetensors")
    return {"cal": calibration, "schedule": str(schedule), "model": model_dir, "root": str(root)}


def case(args: str, code: int, message: str) -> tuple[str, int, str]:
    return args, code, message


CASES = [
    case("plan --calibration {cal} --budget 0", 2, "--budget 0 is out of range: the calibration has 10 steps"),
    case("plan --calibration {cal} --budget 11", 2, "--budget 11 is out of range"),
    case("plan --calibration {cal} --budget 4 --gamma -1", 2, "--gamma -1.0 is invalid"),
    case("plan --calibration {cal} --budget 4 --gamma abc", 2, "Invalid value for '--gamma'"),
    case("plan --calibration {cal} --budget 4 --gamma nan", 2, "--gamma nan is invalid"),
    case("plan --calibration {cal} --budget 4 --cost peak", 2, "--cost peak is unknown"),
    case("plan --calibration {cal} --budget 4 --kmax -1", 2, "--kmax -1 is out of range"),
    case("plan --calibration {cal} --budget 4 --kmax 9", 2, "--kmax 9 is out of range: use 0"),
    case("plan --calibration {cal} --budget 4 --lambdas 0.3", 2, "--lambdas 0.3 not calibrated: use some of 0.5,1"),
    case("plan --calibration {cal} --budget 4 --gamma inf", 2, "--gamma inf is invalid"),
    case("plan --calibration {root}/missing.safetensors --budget 4", 1, "does not exist"),
    case("plan --calibration {root} --budget 4", 1, "is a directory"),
    case("plan --calibration {root}/truncated.safetensors --budget 4", 1, "truncated, corrupted"),
    case("plan --calibration {root}/garbage.safetensors --budget 4", 1, "truncated, corrupted"),
    case("plan --calibration {schedule} --budget 4", 1, "is a schedule, but a calibration is needed"),
    case("plan --calibration {root}/nan.safetensors --budget 4", 1, "NaN or Inf in defined entries"),
    case("plan --calibration {root}/inf.safetensors --budget 4", 1, "NaN or Inf"),
    case("plan --calibration {cal} --budget 4 --out {root}/no/dir/s.yaml", 2, "does not exist; create it first"),
    case("plan --calibration {cal} --budget 4 --out /proc/s.yaml", 2, "is not writable"),
    case("calibrate --model {model} --max-back 0 --out {root}/c.safetensors", 2, "--max-back 0 is invalid"),
    case("calibrate --model {model} --lambdas 0,2 --out {root}/c.safetensors", 2, "--lambdas '0,2' is invalid"),
    case("calibrate --model {model} --steps 1 --out {root}/c.safetensors", 2, "--steps 1 is too small"),
    case("calibrate --model {model} --prompts {root}/empty.txt --out {root}/c.safetensors", 2, "holds no prompt"),
    case("calibrate --model {model} --prompt x --seeds 1,x --out {root}/c.safetensors", 2, "--seeds '1,x' is invalid"),
    case("calibrate --model flx --out {root}/c.safetensors", 2, "unknown model 'flx'"),
    case("calibrate --model dem --out {root}/c.safetensors", 2, "did you mean 'demo'?"),
    case("calibrate --model {model} --out {root}/missing/c.safetensors", 2, "does not exist; create it first"),
    case("generate --model {model} --prompt x --steps 1 --no-cache --out {root}/o.png", 2, "--steps 1 is too small"),
    case("generate --model {model} --prompt x --out {root}/o.png", 2, "no schedule: pass --schedule FILE"),
    case("generate --model {model} --prompt x --schedule {cal} --out {root}/o.png", 1,
         "is a calibration, but a schedule is needed"),
    case("generate --model {model} --prompt x --schedule {root}/v4.yaml --out {root}/o.png", 1,
         "format_version 4 is not supported"),
    case("generate --model {model} --prompt x --schedule {schedule} --steps 12 --strict-schedule --out {root}/o.png",
         1, "planned for 10 steps but this run uses --steps 12"),
    case("plan --calibration {cal} --budget 3 --steps 11", 2, "--steps 11 is more than the calibration's 10 steps"),
    case("generate --model {model} --prompt x --schedule {root}/other-model.yaml --out {root}/o.png", 1,
         "planned for model 'demo' but this run uses"),
    case("generate --model {model} --prompt x --no-cache --out {root}/o.gif2", 2, "unknown image type '.gif2'"),
    case("generate --model {model} --prompt x --no-cache --true-cfg-scale 3 --out {root}/o.png", 2,
         "--true-cfg-scale needs --negative-prompt"),
    # Item 6 of issue 10: accepted before, or failing with a raw exception.
    case("generate --model {model} --prompt x --no-cache --height 30 --width 32 --out {root}/o.png", 2,
         "--height 30 is not a multiple of 4, which this model needs: use 28 or 32"),
    case("calibrate --model {model} --prompt x --height 32 --width 30 --out {root}/c.safetensors", 2,
         "--width 30 is not a multiple of 4"),
    case("generate --model {model} --prompt x --no-cache --width 0 --out {root}/o.png", 2,
         "--width 0 is invalid: use a positive number of pixels"),
    case("calibrate --model {model} --prompt x --height -32 --out {root}/c.safetensors", 2, "--height -32 is invalid"),
    case("generate --model {model} --prompt x --no-cache --true-cfg-scale inf --negative-prompt n --out {root}/o.png",
         2, "--true-cfg-scale inf is invalid: use a finite number ≥ 0"),
    case("calibrate --model {model} --prompt x --true-cfg-scale nan --negative-prompt n --out {root}/c.safetensors",
         2, "--true-cfg-scale nan is invalid"),
    case("generate --model {model} --prompt x --no-cache --guidance-scale nan --out {root}/o.png", 2,
         "--guidance-scale nan is invalid"),
    case("calibrate --model {model} --prompt x --seeds 1,,2 --out {root}/c.safetensors", 2,
         "--seeds '1,,2' is invalid: give comma-separated integers"),
    case("calibrate --model {model} --prompt x --seeds 0,-1 --out {root}/c.safetensors", 2,
         "--seeds -1 is out of range: use an integer from 0 to 2^64 − 1"),
    case("generate --model {model} --prompt x --no-cache --seed 18446744073709551616 --out {root}/o.png", 2,
         "--seed 18446744073709551616 is out of range"),
    case("generate --model {model} --prompt x --no-cache --device cuda:99 --out {root}/o.png", 2, "--device cuda:99: "),
    case("generate --model {model} --prompt x --no-cache --device gpu --out {root}/o.png", 2,
         "--device gpu is not a torch device: use cpu, cuda, cuda:N or mps"),
    case("generate --model {model} --prompt x --schedule {schedule} --compare --repeat 0 --out {root}/o.png", 2,
         "--repeat 0 is invalid: use 1 or more"),
    case("inspect {root}/garbage.safetensors", 1, "neither a MeanCache calibration nor a schedule"),
    # Item 7 of issue 10: a file that cannot be used is one line naming it, exit 1.
    case("calibrate --model {model} --prompts {root}/latin1.txt --out {root}/c.safetensors", 1,
         "latin1.txt is not a UTF-8 text file: save the prompts as UTF-8 text, one per line"),
    case("calibrate --model {model} --prompts {root}/garbage.safetensors --out {root}/c.safetensors", 1,
         "garbage.safetensors is not a UTF-8 text file"),
    case("generate --model {model} --prompts {root}/missing.txt --no-cache --out {root}/images", 1,
         "missing.txt does not exist: check the path"),
    case("calibrate --model {model} --prompts {root} --out {root}/c.safetensors", 1, "is a directory"),
    case("generate --model {root}/broken-model_index --prompt x --no-cache --out {root}/o.png", 1,
         "broken-model_index/model_index.json is not a readable JSON mapping: save the pipeline again"),
    case("generate --model {root}/broken-transformer --prompt x --no-cache --out {root}/o.png", 1,
         "broken-transformer/transformer/config.json is not a readable JSON mapping"),
    case("generate --prompt x", 2, "Missing option '--out'"),
]


@pytest.mark.parametrize(("args", "code", "message"), CASES, ids=[c[0].split(" {")[0] + f"-{i}"
                                                                  for i, c in enumerate(CASES)])
def test_bad_input(files, capsys, args: str, code: int, message: str) -> None:
    root = Path(files["root"])
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    result = run_cli(args.format(**files).split(), capsys)
    assert result.code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before


STDIN_READERS = {  # --prompts - and inspect - read stdin the same way
    "schedule": ["generate", "--prompt", "x", "--schedule", "-", "--out", "{tmp}/o.png"],
    "calibration": ["plan", "--budget", "4", "--calibration", "-"],
}


@pytest.mark.parametrize("reader", list(STDIN_READERS))
def test_reading_stdin_when_it_is_closed(tmp_path, reader: str) -> None:
    args = [a.format(tmp=tmp_path) for a in STDIN_READERS[reader]]
    result = subprocess.run([sys.executable, "-m", "meancache_cli", *args], cwd=ROOT, capture_output=True,
                            preexec_fn=lambda: os.close(0))
    assert result.returncode == 1, result.stderr.decode()
    assert result.stderr.decode().startswith("error: cannot read the ") and b"stdin is closed" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_library_errors_are_one_line_that_says_what_to_do() -> None:
    from meancache_cli.errors import describe

    assert describe(ModuleNotFoundError("x", name="imageio_ffmpeg.binaries")) == (
        "this needs the Python package 'imageio-ffmpeg', which is not installed: pip install imageio-ffmpeg")
    assert describe(OSError(28, "No space left on device", "/data/cal.safetensors")) == (
        "No space left on device: /data/cal.safetensors; check the path, its permissions and the free space")
    assert describe(MemoryError()).startswith("out of memory: lower --height")


def test_debug_shows_the_traceback(files, capsys) -> None:
    with pytest.raises(Exception, match="does not exist"):
        run_cli(["--debug", "plan", "--calibration", files["root"] + "/missing.safetensors", "--budget", "4"],
                capsys)


def calibrate_command(model: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "meancache_cli", "calibrate", "--model", model, "--prompt", "a red circle",
            "--prompt", "a blue star", "--prompt", "a green square", "--seeds", "0,1", "--steps", "8", *SIZE,
            "--max-back", "2", "--out", str(out), *extra]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_calibration_leaves_nothing_and_resumes_to_the_same_result(model_dir, tmp_path,
                                                                               signum: int) -> None:
    out = tmp_path / "cal.safetensors"
    shards = tmp_path / ".cal.safetensors.shards"
    process = subprocess.Popen(calibrate_command(model_dir, out), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(shards.glob("*.safetensors"))) < 2:
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err.decode()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [shards.name]
    done = len(list(shards.glob("*.safetensors")))
    assert 2 <= done < 6
    assert err.decode() == (f"interrupted: {done} of 6 reference runs are saved in {shards}; run the same command "
                            "with --resume to continue\n")
    if signum == signal.SIGTERM:
        return

    resumed = subprocess.run(calibrate_command(model_dir, out, "--resume", "--json"), cwd=ROOT, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert json.loads(resumed.stdout)["reused"] == done and resumed.stderr == b""
    assert not shards.exists()
    fresh_out = tmp_path / "fresh.safetensors"
    fresh = subprocess.run(calibrate_command(model_dir, fresh_out), cwd=ROOT, capture_output=True)
    assert fresh.returncode == 0, fresh.stderr.decode()
    a, b = load_calibration(out), load_calibration(fresh_out)
    np.testing.assert_array_equal(a.errors.jvp, b.errors.jvp)
    np.testing.assert_array_equal(a.errors.reuse, b.errors.reuse)
    assert a.metadata() == b.metadata() and a.trajectories == 4 and len(a.held_out) == 2  # 6 runs: 2 held out


def handles(pid: int, signum: int) -> bool:
    """Whether process `pid` has installed a handler for `signum` (the SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_during_start_up_exits_130_without_a_traceback(model_dir, tmp_path, signum: int) -> None:
    out = tmp_path / "cal.safetensors"
    process = subprocess.Popen(calibrate_command(model_dir, out), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 5  # the handlers come before torch and diffusers are imported
    while not handles(process.pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handles(process.pid, signal.SIGTERM), "no SIGTERM handler 5 s after start"
    time.sleep(0.5)  # now importing torch and diffusers, or loading the model
    assert process.poll() is None
    process.send_signal(signum)
    out_text, err = process.communicate(timeout=120)
    assert process.returncode == 130, (process.returncode, err.decode())
    assert err.decode() == "interrupted\n" and out_text == b""
    assert list(tmp_path.iterdir()) == []
