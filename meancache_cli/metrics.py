"""Quality against a reference: PSNR and SSIM on decoded images in [0, 1], PSNR on latents (what `generate
--compare` reports, what a plan is validated on, what the bench measures every method by)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def as_float_image(image: object) -> np.ndarray:
    """HxWxC float64 in [0, 1] from a PIL image or a uint8/float array."""
    array = np.asarray(image)
    return array.astype(np.float64) / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)


def psnr(image: object, reference: object) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = float(np.mean((as_float_image(image) - as_float_image(reference)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def ssim(image: object, reference: object, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, averaged over channels."""
    a = torch.from_numpy(as_float_image(image)).permute(2, 0, 1)[None]
    b = torch.from_numpy(as_float_image(reference)).permute(2, 0, 1)[None]
    channels = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).expand(channels, 1, size, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


PSNR_CAP = 100.0


def frames_of(item: object) -> list[object]:
    """The frames of one output: a video (list of frames or a 4-D array) or a single image."""
    if isinstance(item, (list, tuple)):
        return list(item)
    array = np.asarray(item)
    return list(array) if array.ndim == 4 else [item]


def compare(item: object, reference: object) -> tuple[float, float]:
    """(PSNR, SSIM) of one image or video against its reference, averaged per frame.

    PSNR is capped at `PSNR_CAP` dB so identical outputs average to a finite number.
    """
    pairs = list(zip(frames_of(item), frames_of(reference), strict=True))
    psnrs = [min(psnr(a, b), PSNR_CAP) for a, b in pairs]
    ssims = [ssim(a, b) for a, b in pairs]
    return float(np.mean(psnrs)), float(np.mean(ssims))


def latent_psnr(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of final latents against reference latents, in dB, capped at `PSNR_CAP`.

    Latents have no fixed range, so the peak is the reference's own dynamic range (max − min): no
    decoder blurs the difference, and the number stays comparable across methods on the same reference.
    """
    reference = reference.detach().double().reshape(-1)
    latents = latents.detach().double().reshape(-1)
    if latents.shape != reference.shape:
        raise ValueError(f"latents of {latents.numel()} elements cannot be compared with {reference.numel()}")
    peak = float(reference.max() - reference.min())
    mse = float(torch.mean((latents - reference) ** 2))
    if mse == 0:
        return PSNR_CAP
    return min(PSNR_CAP, 10 * float(np.log10(peak**2 / mse)) if peak > 0 else float("-inf"))
