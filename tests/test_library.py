"""Loading, batch generation and context parallelism as library calls: the CLI only parses, calls and prints."""

import json

import pytest

from meancache_cli.batch import generate_batch, pending_jobs, plan_jobs
from meancache_cli.calibration import MapSettings
from meancache_cli.distributed import World, enable_context_parallel
from meancache_cli.errors import UsageError
from meancache_cli.models.loading import load_model

CALL = {"num_inference_steps": 3, "height": 32, "width": 32}


def test_load_model_checks_its_options_and_returns_the_pipeline(model_dir) -> None:
    spec, pipe, notices = load_model(model_dir)
    assert spec.name == model_dir and type(pipe).__name__ == "FluxPipeline" and notices == []
    with pytest.raises(UsageError, match="--dtype fp64 is unknown: use one of bf16, fp16, fp32"):
        load_model(model_dir, dtype="fp64")
    with pytest.raises(UsageError, match="--offload moves parts to an accelerator"):
        load_model(model_dir, offload=True)


def test_generate_batch_writes_outputs_and_a_manifest(model_dir, tmp_path) -> None:
    spec, pipe, _ = load_model(model_dir)
    out = tmp_path / "images"
    jobs = plan_jobs(["a red circle", "a blue star", "a green square"], 5, out)
    world = World()
    summary = generate_batch(pipe, spec, jobs, CALL, None, out, 2, world, None)
    assert summary == {"output": str(out), "manifest": str(out / "manifest.jsonl"), "prompts": 3, "generated": 3,
                       "skipped": 0, "processes": 1, "written": 3}
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [5, 6, 7] and all(r["nfe"] == 3 for r in records)
    assert pending_jobs(jobs, world) == []


def test_context_parallel_needs_as_many_processes_as_its_degree(model_dir) -> None:
    _, pipe, _ = load_model(model_dir)
    with pytest.raises(UsageError, match=r"--context-parallel 2 needs torchrun with exactly 2 processes \(this run"):
        enable_context_parallel(pipe, 2, World())


def test_a_damaged_saved_run_is_named_with_the_way_out(model_dir, tmp_path) -> None:
    from meancache_cli.calibration import run_calibration
    from meancache_cli.errors import FileFormatError

    spec, pipe, _ = load_model(model_dir)
    shards = tmp_path / ".cal.safetensors.shards"
    run_calibration(pipe, spec.name, ["a red circle"], [0, 1], CALL, MapSettings(max_back=1), shards=shards)
    damaged = sorted(shards.iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.raises(FileFormatError, match=f"the saved run {damaged} is unreadable .truncated or corrupted.: "
                                              "delete it and run again with --resume, or calibrate without --resume"):
        run_calibration(pipe, spec.name, ["a red circle"], [0, 1], CALL, MapSettings(max_back=1), shards=shards)
