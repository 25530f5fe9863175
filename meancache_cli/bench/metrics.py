"""Image quality against the uncached reference: PSNR and SSIM on decoded images in [0, 1]."""

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
