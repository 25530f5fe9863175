"""inspect: summaries of calibrations and schedules, the error-map plot; provenance and determinism."""

import hashlib
import json

from cli_helpers import run_cli, run_process
from PIL import Image

from meancache_cli import load_schedule
from meancache_cli.outputs import read_provenance

SIZE = ["--height", "32", "--width", "32"]


def test_inspect_summarizes_and_plots_a_schedule_on_its_calibration(calibration, tmp_path, capsys) -> None:
    schedule = tmp_path / "s.yaml"
    assert run_cli(["plan", "--calibration", calibration, "--budget", "4", "--out", str(schedule)], capsys).code == 0
    plot = tmp_path / "map.png"
    result = run_cli(["inspect", str(schedule), "--plot", str(plot), "--json"], capsys)
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    planned = load_schedule(schedule)
    assert data["kind"] == "schedule" and data["budget"] == 4 and data["compute_steps"] == planned.compute_steps
    assert sum(data["edge_lengths"]) == 10 and data["plot"] == str(plot)
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 600

    calibrated = run_cli(["inspect", calibration], capsys)
    assert calibrated.code == 0
    assert "kind: calibration" in calibrated.stdout and "trajectories: 3" in calibrated.stdout
    assert "held_out: ['a red circle (seed 0)']" in calibrated.stdout
    assert "max_back: 3" in calibrated.stdout


def test_same_seed_and_schedule_give_the_same_bytes_across_processes(model_dir, calibration, tmp_path) -> None:
    schedule = tmp_path / "s.yaml"
    assert run_process(["plan", "--calibration", calibration, "--budget", "4", "--out", str(schedule)]).returncode == 0
    outputs = []
    for name in ("a.png", "b.png"):
        out = tmp_path / name
        done = run_process(["generate", "--model", model_dir, "--prompt", "a red circle", "--seed", "3",
                            "--schedule", str(schedule), *SIZE, "--out", str(out)])
        assert done.returncode == 0, done.stderr.decode()
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    provenance = read_provenance(tmp_path / "a.png")
    assert provenance == {"model": model_dir, "prompt": "a red circle", "seed": 3, "steps": 10, "nfe": 4,
                          "schedule_sha256": hashlib.sha256(schedule.read_bytes()).hexdigest()}
