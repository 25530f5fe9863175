"""Loading a model for a command: device and dtype checked first, then the pipeline, quietly.

The CLI shows a spinner around `load_model` and prints the notices it returns; nothing here prints.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import UsageError
from .registry import ModelSpec, load_pipeline, resolve_model
from .schedulers import SchedulerSwapWarning

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_dtype(dtype: str | None, device: str) -> Any:
    """A torch dtype from its short name; bf16 on CUDA and fp32 elsewhere when not given."""
    import torch

    if dtype is None:
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype} is unknown: use one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


def load_model(model: str | ModelSpec, device: str = "cpu", dtype: str | None = None,
               offload: bool = False) -> tuple[ModelSpec, Any, list[str]]:
    """Resolve (a name or a directory) and load a pipeline; returns its spec, the pipeline and notices
    for the user (a scheduler that had to be replaced)."""
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    torch_dtype = parse_dtype(dtype, device)
    if offload and device == "cpu":
        raise UsageError("--offload moves parts to an accelerator while they run: use it with --device cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SchedulerSwapWarning)
        pipe = load_pipeline(spec, device=device, dtype=torch_dtype, offload=offload)
    notices = [str(w.message) for w in caught if issubclass(w.category, SchedulerSwapWarning)]
    return spec, pipe, notices
