"""torchrun: two CPU processes (gloo) calibrate the demo model exactly like one process does."""

import subprocess
import sys

import numpy as np
from cli_helpers import ROOT

from meancache_cli.distributed import World
from meancache_cli.files import load_calibration

CALIBRATE = ["calibrate", "--model", "demo", "--prompt", "a red circle on a blue background", "--prompt",
             "a white star on a black background", "--prompt", "a green square on a yellow background",
             "--seeds", "3,4", "--steps", "12", "--kmax", "3"]


def test_world_shares_cover_every_item_once() -> None:
    items = list(range(7))
    shares = [World(rank=r, size=3).share(items) for r in range(3)]
    assert sorted(x for share in shares for x in share) == items
    assert [len(s) for s in shares] == [3, 2, 2]


def test_two_process_calibration_equals_one_process(tmp_path) -> None:
    single, double = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    one = subprocess.run([sys.executable, "-m", "meancache_cli", *CALIBRATE, "--out", str(single)], cwd=ROOT,
                         capture_output=True, timeout=600)
    assert one.returncode == 0, one.stderr.decode()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "meancache_cli", *CALIBRATE, "--out", str(double), "--json"], cwd=ROOT,
                         capture_output=True, timeout=600)
    assert two.returncode == 0, two.stderr.decode()
    assert b'"processes": 2' in two.stdout and two.stdout.count(b"{") == 1
    a, b = load_calibration(single), load_calibration(double)
    assert a.metadata() == b.metadata() and b.trajectories == 6
    np.testing.assert_allclose(b.errors, a.errors, rtol=1e-9, atol=1e-15, equal_nan=True)
    for name, values in a.step_statistics.items():
        np.testing.assert_allclose(b.step_statistics[name], values, rtol=1e-9, equal_nan=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]
