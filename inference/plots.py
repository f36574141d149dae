"""Figures: image grids of data or samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def image_grid(images: Tensor, image_shape: tuple[int, ...], ncol: int | None = None) -> np.ndarray:
    """Tiles flattened images ``(N, H*W)`` into one ``(rows*H, ncol*W)`` array in [0, 1].

    torchvision's ``make_grid`` is used when it imports; otherwise NumPy does the tiling.
    """
    n = images.shape[0]
    ncol = ncol or math.ceil(math.sqrt(n))
    images = images.detach().float().cpu().clamp(0, 1).reshape(n, 1, *image_shape)
    try:
        from torchvision.utils import make_grid
    except Exception:  # noqa: BLE001 - torchvision is optional
        rows = math.ceil(n / ncol)
        padded = torch.zeros(rows * ncol, *images.shape[1:])
        padded[:n] = images
        h, w = image_shape
        grid = padded.reshape(rows, ncol, h, w).permute(0, 2, 1, 3).reshape(rows * h, ncol * w)
        return grid.numpy()
    return make_grid(images, nrow=ncol, padding=0)[0].numpy()


def save_image_grid(images: Tensor, image_shape: tuple[int, ...], path: str | Path) -> None:
    """Writes an image grid of ``images`` to ``path`` (PNG or anything matplotlib writes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = image_grid(images, image_shape)
    height, width = grid.shape
    scale = max(1.0, 400 / max(height, width))
    fig = plt.figure(figsize=(width * scale / 100, height * scale / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    fig.savefig(path)
    plt.close(fig)
