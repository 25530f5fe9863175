"""Batch generation from a prompts file: numbered outputs and a JSONL manifest, resumable, torchrun-aware."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import defaults
from .calibration import Progress
from .distributed import World
from .files import Schedule, write_atomic
from .generate import generate, provenance, save_output
from .models.registry import ModelSpec

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Job:
    index: int
    prompt: str
    seed: int
    path: Path


def plan_jobs(prompts: list[str], seed: int, out_dir: Path, suffix: str = ".png") -> list[Job]:
    """Prompt i becomes `out_dir/00000i.png`, drawn from seed `seed + i`."""
    return [Job(i, prompt, seed + i, out_dir / f"{i:06d}{suffix}") for i, prompt in enumerate(prompts)]


def _rank_manifest(out_dir: Path, rank: int) -> Path:
    return out_dir / f".manifest.rank{rank}.jsonl"


def run_batch(
    pipe: Any,
    jobs: list[Job],
    call_kwargs: dict[str, Any],
    schedule: Schedule | None,
    save: Callable[[Any, Path, dict[str, Any]], None],
    batch_size: int = defaults.BATCH_SIZE,
    world: World | None = None,
    on_image: Callable[[], None] | None = None,
    strict: bool = False,
) -> int:
    """Generate this rank's jobs whose output does not exist yet; returns how many were generated.

    Each finished image appends a line to this rank's manifest part, so an interrupted batch resumes.
    """
    world = world or World()
    todo = pending_jobs(jobs, world)
    part = _rank_manifest(jobs[0].path.parent, world.rank) if jobs else None
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        result = generate(pipe, [job.prompt for job in chunk], [job.seed for job in chunk], call_kwargs, schedule,
                          strict=strict)
        for job, image in zip(chunk, result.images):
            record = provenance(schedule, index=job.index, prompt=job.prompt, seed=job.seed, file=job.path.name,
                                nfe=result.nfe, seconds=result.seconds, batch=len(chunk))
            save(image, job.path, record)
            with open(part, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if on_image is not None:
                on_image()
    return len(todo)


def merge_manifests(out_dir: Path, world_size: int) -> list[dict[str, Any]]:
    """Fold every rank's part into `manifest.jsonl` (one line per index, newest wins), sorted by index."""
    records: dict[int, dict[str, Any]] = {}
    sources = [out_dir / MANIFEST, *(_rank_manifest(out_dir, r) for r in range(world_size))]
    for source in sources:
        if source.exists():
            for line in source.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    records[record["index"]] = record
    merged = [records[i] for i in sorted(records)]
    write_atomic(out_dir / MANIFEST, "".join(json.dumps(r) + "\n" for r in merged).encode())
    for rank in range(world_size):
        _rank_manifest(out_dir, rank).unlink(missing_ok=True)
    return merged


def pending_jobs(jobs: list[Job], world: World) -> list[Job]:
    """This rank's jobs whose output does not exist yet."""
    return [job for job in world.share(jobs) if not job.path.exists()]


def generate_batch(pipe: Any, spec: ModelSpec, jobs: list[Job], call_kwargs: dict[str, Any],
                   schedule: Schedule | None, out_dir: Path, batch_size: int, world: World, fps: int | None,
                   strict: bool = False, progress: Progress | None = None) -> dict[str, Any] | None:
    """Every job into `out_dir/` (images or videos by the model's kind), then the merged manifest.

    `progress(jobs)`, given how many jobs this process has left, opens the callback that sees each finished one.
    Returns the summary on rank 0 and None on the other ranks, which leave reporting to rank 0.
    """
    out_dir.mkdir(exist_ok=True)

    def save(item: Any, path: Path, record: dict[str, Any]) -> None:
        save_output(item, path, spec, fps, {"model": spec.name, "steps": call_kwargs["num_inference_steps"], **record})

    left = len(pending_jobs(jobs, world))
    with progress(left) if progress is not None else nullcontext() as on_image:
        done = run_batch(pipe, jobs, call_kwargs, schedule, save, batch_size, world, on_image=on_image, strict=strict)
    world.barrier()
    if not world.is_main:
        return None
    records = merge_manifests(out_dir, world.size)
    return {"output": str(out_dir), "manifest": str(out_dir / MANIFEST), "prompts": len(jobs),
            "generated": done, "skipped": len(world.share(jobs)) - done, "processes": world.size,
            "written": len(records)}
