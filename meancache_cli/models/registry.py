"""Supported pipelines by name (`configs/<name>.yaml`), and loading a pipeline by name or directory."""

from __future__ import annotations

import difflib
import json
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import MeanCacheError, UsageError


@dataclass(frozen=True)
class ModelSpec:
    """A model's identity and the defaults a generation uses unless the command line overrides them."""

    name: str
    pipeline_class: str
    repo_id: str | None = None
    description: str = ""
    steps: int = 50
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    calibration_prompts: list[str] = field(default_factory=list)
    calibration_seeds: list[int] = field(default_factory=lambda: [1000, 1001])
    path: Path | None = None


def _config_files() -> dict[str, Any]:
    return {f.name.removesuffix(".yaml"): f for f in resources.files("meancache_cli.configs").iterdir()
            if f.name.endswith(".yaml")}


def registered_models() -> list[ModelSpec]:
    """Every model that has a config, sorted by name."""
    return [_spec_from_config(name, file) for name, file in sorted(_config_files().items())]


def _spec_from_config(name: str, file: Any) -> ModelSpec:
    data = yaml.safe_load(file.read_text())
    data.pop("name", None)
    return ModelSpec(name=name, **data)


def resolve_model(model: str) -> ModelSpec:
    """A registered name, or a local directory holding a saved diffusers pipeline."""
    configs = _config_files()
    if model in configs:
        return _spec_from_config(model, configs[model])
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise UsageError(f"{path} has no model_index.json: pass a directory saved with save_pretrained")
        pipeline_class = json.loads(index.read_text()).get("_class_name", "")
        return ModelSpec(name=str(path), pipeline_class=pipeline_class, path=path)
    close = difflib.get_close_matches(model, configs, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(
        f"unknown model '{model}': {hint}use one of {', '.join(sorted(configs))} or a local pipeline directory"
    )


def load_pipeline(spec: ModelSpec, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Instantiate the pipeline, quietly: stderr belongs to our own progress bars."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if spec.name == "demo":
        from .demo import load_demo_pipeline

        pipe = load_demo_pipeline(dtype)
    else:
        source = str(spec.path) if spec.path is not None else spec.repo_id
        pipeline_class = getattr(diffusers, spec.pipeline_class, None)
        if pipeline_class is None:
            raise MeanCacheError(f"{spec.pipeline_class} is not a diffusers pipeline: upgrade diffusers")
        with warnings.catch_warnings():
            # Newer diffusers prefer `dtype=`; `torch_dtype=` is what every supported release knows.
            warnings.simplefilter("ignore", FutureWarning)
            pipe = pipeline_class.from_pretrained(source, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
