"""Supported pipelines by name (`configs/<name>.yaml`), and loading a pipeline by name or directory."""

from __future__ import annotations

import difflib
import json
import warnings
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import MeanCacheError, UsageError
from .adapters import ADAPTERS, adapter_for
from .schedulers import SchedulerSwapWarning, euler_scheduler_swap


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
    fps: int | None = None
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    calibration_prompts: list[str] = field(default_factory=list)
    calibration_seeds: list[int] = field(default_factory=lambda: [1000, 1001, 1002])
    # Transformer config values that tell this family from another with the same pipeline class
    # (FLUX.1 [dev] embeds guidance, [schnell] does not); matched against a saved pipeline directory.
    transformer_config: dict[str, Any] = field(default_factory=dict)
    # How `meancache bench` runs this model (configurations, prompt set, peers it cannot run): see
    # `bench.runner.BenchProfile`; empty: its own default call arguments on the generic prompts.
    bench: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    family: str | None = None  # for a pipeline directory: the registered model whose defaults it got


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
        pipeline_class = _read_json(index).get("_class_name", "")
        family = _family(path, pipeline_class)
        if family is None:
            return ModelSpec(name=str(path), pipeline_class=pipeline_class, path=path)
        return replace(family, name=str(path), path=path, repo_id=None, family=family.name,
                       description=f"{family.name} pipeline saved in {path}")
    close = difflib.get_close_matches(model, configs, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(
        f"unknown model '{model}': {hint}use one of {', '.join(sorted(configs))} or a local pipeline directory"
    )


def _family(path: Path, pipeline_class: str) -> ModelSpec | None:
    """The registered model a saved pipeline directory is an instance of: the same pipeline class and, where
    several share it, the one whose `transformer_config` the saved transformer matches, the most specific
    first (then by name). The demo matches only its own transformer's sizes."""
    config_file = path / "transformer" / "config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    matching = [spec for spec in registered_models() if spec.pipeline_class == pipeline_class
                and all(config.get(key) == value for key, value in spec.transformer_config.items())]
    return max(matching, key=lambda spec: len(spec.transformer_config), default=None)


def _read_json(file: Path) -> dict[str, Any]:
    """A saved pipeline's model_index.json or config.json; a damaged one is one line naming it."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        raise MeanCacheError(f"{file} is not a readable JSON mapping: save the pipeline again with save_pretrained")
    return data


def _check_transformer(spec: ModelSpec) -> None:
    """Refuse a local pipeline whose transformer has no adapter before loading any weights."""
    if spec.path is None:
        return
    entry = _read_json(spec.path / "model_index.json").get("transformer")
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise MeanCacheError(f"{spec.path} holds a {spec.pipeline_class or 'pipeline'} without a transformer: "
                             "MeanCache supports flow-matching transformer pipelines")
    if entry[1] not in ADAPTERS:
        raise MeanCacheError(f"{spec.path}: {entry[1]} is not a supported flow-matching transformer: MeanCache "
                             f"supports {', '.join(sorted(ADAPTERS))}")


def _from_pretrained(pipeline_class: Any, spec: ModelSpec, dtype: torch.dtype) -> Any:
    """Load weights from a local directory or the Hugging Face cache/hub; one-line error when they are not there."""
    from diffusers.utils import logging

    source = str(spec.path) if spec.path is not None else spec.repo_id
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # "Couldn't connect to the Hub" and the like: the error below says it in one line
    try:
        with warnings.catch_warnings():
            # Newer diffusers prefer `dtype=`; `torch_dtype=` is what every supported release knows.
            warnings.simplefilter("ignore", FutureWarning)
            return pipeline_class.from_pretrained(source, torch_dtype=dtype)
    except OSError as error:  # huggingface_hub's offline, gated and not-found errors are OSErrors
        if spec.path is not None:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise MeanCacheError(f"cannot load the pipeline in {spec.path}: {reason}") from None
        raise MeanCacheError(
            f"cannot load {spec.repo_id}: its weights are not available here (offline, a gated repo without access, "
            f"or no Hugging Face token); download them or pass a local directory with --model /path/to/saved/pipeline"
        ) from None
    finally:
        logging.set_verbosity(level)


def load_pipeline(spec: ModelSpec, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  offload: bool = False) -> Any:
    """Instantiate the pipeline, quietly: stderr belongs to our own progress bars.

    The transformer must have an adapter, and a scheduler other than flow-matching Euler is replaced by one
    with the same shift (with a `SchedulerSwapWarning`). `offload` moves each part to `device` only while it
    runs (`enable_model_cpu_offload`).
    """
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if spec.name == "demo":
        from .demo import load_demo_pipeline

        pipe = load_demo_pipeline(dtype)
    elif spec.name == "hard":
        from .hard import load_hard_pipeline

        pipe = load_hard_pipeline(dtype)
    else:
        pipeline_class = getattr(diffusers, spec.pipeline_class, None)
        if pipeline_class is None:
            raise MeanCacheError(f"{spec.pipeline_class} is not a diffusers pipeline: upgrade diffusers")
        _check_transformer(spec)
        pipe = _from_pretrained(pipeline_class, spec, dtype)
    if getattr(pipe, "transformer", None) is None:
        raise MeanCacheError(f"{type(pipe).__name__} has no transformer: MeanCache supports flow-matching "
                             "transformer pipelines")
    adapter_for(pipe.transformer)
    message = euler_scheduler_swap(pipe)
    if message is not None:
        warnings.warn(message, SchedulerSwapWarning, stacklevel=2)
    pipe.set_progress_bar_config(disable=True)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)
