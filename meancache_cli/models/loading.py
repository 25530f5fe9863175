"""Loading a model for a command: device and dtype checked first, then the pipeline, quietly.

The CLI shows a spinner around `load_model` and prints the notices it returns; nothing here prints.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import UsageError, interrupts_raise
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


def check_device(device: str) -> None:
    """Refuse a device this torch cannot use before anything is loaded."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device} is not a torch device: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: torch sees no CUDA GPU here (no GPU, no driver, or a CPU-only "
                             "torch build); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")


def size_multiple(pipe: Any) -> int:
    """What height and width must be a multiple of: latents are VAE-downscaled, then cut into 2×2
    patches. FLUX, Qwen-Image and Chroma round other sizes silently; SD3, Wan, HunyuanVideo and
    Z-Image refuse them."""
    if hasattr(pipe, "vae_scale_factor_spatial"):
        return 16  # Wan and HunyuanVideo check `height % 16` whatever their VAE
    return int(pipe.vae_scale_factor) * int(getattr(pipe, "patch_size", 2))


def check_image_size(pipe: Any, height: int | None, width: int | None) -> None:
    """Refuse a height or width the pipeline would change or reject, naming the nearest sizes it runs."""
    multiple = size_multiple(pipe)
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and value % multiple:
            below, above = value - value % multiple, value - value % multiple + multiple
            nearest = f"{below} or {above}" if below > 0 else f"{above}"
            raise UsageError(f"{flag} {value} is not a multiple of {multiple}, which this model needs: use {nearest}")


def quiet_libraries() -> None:
    """Only errors from diffusers' and transformers' loggers: their notices (a CLIP prompt truncated, with
    the whole rest of the prompt quoted; a missing torchvision) are not for someone running a command."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def load_model(model: str | ModelSpec, device: str = "cpu", dtype: str | None = None,
               offload: bool = False) -> tuple[ModelSpec, Any, list[str]]:
    """Resolve (a name or a directory) and load a pipeline; returns its spec, the pipeline and notices
    for the user (a scheduler that had to be replaced)."""
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    check_device(device)
    torch_dtype = parse_dtype(dtype, device)
    if offload and device == "cpu":
        raise UsageError("--offload moves parts to an accelerator while they run: use it with --device cuda")
    quiet_libraries()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SchedulerSwapWarning)
        pipe = load_pipeline(spec, device=device, dtype=torch_dtype, offload=offload)
    interrupts_raise()  # the extension modules are imported: a signal can now unwind with clean-up
    notices = [str(w.message) for w in caught if issubclass(w.category, SchedulerSwapWarning)]
    return spec, pipe, notices
