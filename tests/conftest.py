"""Shared test set-up: offline hub access, and a tiny pipeline on disk with its calibration."""

import logging
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# torchao (a dev dependency) logs at import the CUDA kernels it cannot load here; the command quiets it the same way.
for name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(name).setLevel(logging.ERROR)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny random FluxPipeline saved with save_pretrained, loadable with --model DIR."""
    from tiny import tiny_flux_pipeline

    path = tmp_path_factory.mktemp("tiny-flux")
    tiny_flux_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def calibration(model_dir, tmp_path_factory) -> str:
    """A 10-step calibration of the tiny pipeline: 2 prompts × 2 seeds, look-back 3, made by the CLI."""
    from cli_helpers import run_process

    out = tmp_path_factory.mktemp("cal") / "cal.safetensors"
    result = run_process(["calibrate", "--model", model_dir, "--prompt", "a red circle", "--prompt",
                          "a blue star", "--seeds", "0,1", "--steps", "10", "--height", "32", "--width", "32",
                          "--max-back", "3", "--out", str(out), "--json"])
    assert result.returncode == 0, result.stderr.decode()
    return str(out)
