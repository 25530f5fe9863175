"""torchrun: two CPU processes (gloo) calibrate the demo model exactly like one process does."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import ROOT
from PIL import Image

from meancache_cli.distributed import World
from meancache_cli.files import load_calibration

CALIBRATE = ["calibrate", "--model", "demo", "--prompt", "a red circle on a blue background", "--prompt",
             "a white star on a black background", "--prompt", "a green square on a yellow background",
             "--seeds", "3,4", "--steps", "12", "--max-back", "3"]


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
    assert json.loads(two.stdout)["processes"] == 2 and len(two.stdout.splitlines()) == 1
    a, b = load_calibration(single), load_calibration(double)
    # 6 runs, the first seed's 2 held out (rank 0 runs them), 4 in the maps with 2 branches each (true CFG)
    assert a.metadata() == b.metadata() and b.trajectories == 8
    np.testing.assert_allclose(b.errors.jvp, a.errors.jvp, rtol=1e-9, atol=1e-15, equal_nan=True)
    np.testing.assert_allclose(b.errors.exp, a.errors.exp, rtol=1e-9, atol=1e-15, equal_nan=True)
    for mine, theirs in zip(b.held_out, a.held_out, strict=True):
        np.testing.assert_allclose(mine.final, theirs.final, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.errors.reuse, a.errors.reuse, rtol=1e-9, atol=1e-15, equal_nan=True)
    for name, values in a.step_statistics.items():
        np.testing.assert_allclose(b.step_statistics[name], values, rtol=1e-9, equal_nan=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]


def test_context_parallel_needs_torchrun_with_matching_processes(tmp_path, capsys) -> None:
    from cli_helpers import run_cli

    out = tmp_path / "o.png"
    result = run_cli(["generate", "--model", "demo", "--prompt", "a red circle on a blue background", "--no-cache",
                      "--context-parallel", "2", "--out", str(out)], capsys)
    assert result.code == 2
    assert "--context-parallel 2 needs torchrun with exactly 2 processes (this run has 1)" in result.stderr
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="diffusers' context parallelism needs two or more CUDA devices; this machine has none")
def test_context_parallel_generation_matches_single_gpu(tmp_path) -> None:
    single, split = tmp_path / "one.png", tmp_path / "two.png"
    args = ["generate", "--model", "demo", "--prompt", "a red circle on a blue background", "--no-cache",
            "--device", "cuda", "--dtype", "bf16"]
    one = subprocess.run([sys.executable, "-m", "meancache_cli", *args, "--out", str(single)], cwd=ROOT,
                         capture_output=True, timeout=600)
    assert one.returncode == 0, one.stderr.decode()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "meancache_cli", *args, "--context-parallel", "2", "--out", str(split)], cwd=ROOT,
                         capture_output=True, timeout=600)
    assert two.returncode == 0, two.stderr.decode()
    a = np.asarray(Image.open(single), dtype=float)
    b = np.asarray(Image.open(split), dtype=float)
    assert np.abs(a - b).mean() < 2.0  # bf16 tolerance, in 8-bit pixel units
