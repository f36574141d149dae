"""Figures: image grids of data or samples, and the panels and page of the run report.

Figure builders return a matplotlib ``Figure`` (Agg backend); :func:`figure_to_base64`
renders one for embedding in HTML, and :func:`html_page` assembles a self-contained page.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from pyrovae.inference.errors import PyrovaeError
from pyrovae.model.networks import image_layout

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure


def image_grid(images: Tensor, image_shape: tuple[int, ...], ncol: int | None = None) -> np.ndarray:
    """Tiles flattened images ``(N, C*H*W)`` into one array in [0, 1]: ``(rows*H, ncol*W)``
    for grey images (``image_shape`` ``(H, W)`` or ``(1, H, W)``), ``(rows*H, ncol*W, 3)``
    for RGB ones (``(3, H, W)``).

    torchvision's ``make_grid`` is used when it imports; otherwise NumPy does the tiling.
    """
    channels, h, w = image_layout(image_shape)
    n = images.shape[0]
    ncol = ncol or math.ceil(math.sqrt(n))
    images = images.detach().float().cpu().clamp(0, 1).reshape(n, channels, h, w)
    try:
        from torchvision.utils import make_grid
    except Exception:  # noqa: BLE001 - torchvision is optional
        rows = math.ceil(n / ncol)
        padded = torch.zeros(rows * ncol, *images.shape[1:])
        padded[:n] = images
        grid = padded.reshape(rows, ncol, channels, h, w).permute(0, 3, 1, 4, 2)
        grid = grid.reshape(rows * h, ncol * w, channels)
    else:
        grid = make_grid(images, nrow=ncol, padding=0).permute(1, 2, 0)
    return (grid[..., 0] if channels == 1 else grid).numpy()


def drawable(image_shape: tuple[int, ...]) -> bool:
    """Whether data of ``image_shape`` can be drawn as images: ``(H, W)``, or ``(C, H, W)``
    with one channel (grey) or three (RGB)."""
    try:
        channels, _, _ = image_layout(image_shape)
    except ValueError:
        return False
    return channels in (1, 3)


def check_image_path(path: str | Path) -> None:
    """Refuses, before any work, an image path matplotlib cannot write: an unknown extension
    or a folder that is missing or read-only.

    Raises:
        PyrovaeError: one line naming the problem and the valid extensions.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pyrovae.inference.experiment.runs import check_writable

    path = Path(path)
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    extension = path.suffix.lstrip(".").lower()
    if extension not in formats:
        raise PyrovaeError(
            f"cannot write an image to {path}: unknown extension {path.suffix or '(none)'!r}; "
            f"valid: {', '.join(sorted(formats))}"
        )
    check_writable(path, "image")


def save_image_grid(images: Tensor, image_shape: tuple[int, ...], path: str | Path) -> None:
    """Writes an image grid of ``images`` to ``path`` (PNG or anything matplotlib writes)."""
    grid = separated_grid(images, image_shape, math.ceil(math.sqrt(images.shape[0])))
    height, width = grid.shape[:2]
    scale = max(1.0, 400 / max(height, width))
    fig = _figure(figsize=(width * scale / 100, height * scale / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(_white_borders(grid), cmap=_grey(), vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    from pyrovae.inference.experiment.runs import atomic_write

    # Rendered in memory, then renamed into place: a grid being replaced is never half-written.
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png")
    atomic_write(Path(path), buffer.getvalue())


def figure_to_base64(fig: Figure, dpi: int = 100) -> str:
    """Renders a figure as a base64 PNG for embedding (``data:image/png;base64,...``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def training_curves_figure(history: Sequence[Mapping[str, float]]) -> Figure:
    """ELBO per epoch (train and validation), and one panel per logged reconstruction or KL column.

    Epochs are whole-number ticks; a run of a single epoch shows its values as labelled points
    on an axis of one epoch either side, not on a fractional axis around it.
    """
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    extra = [k for k in history[0] if "reconstruction" in k or "kl" in k] if history else []
    fig, axes = _subplots(1, 1 + len(extra), figsize=(5.5 * (1 + len(extra)), 3.4), squeeze=False)
    panels = [(axes[0, 0], ("train_elbo", "validation_elbo"), "ELBO", None)]
    panels += [
        (ax, (key,), key.replace("_", " "), "tab:green")
        for ax, key in zip(axes[0, 1:], extra, strict=True)
    ]
    for ax, keys, title, colour in panels:
        for key in keys:
            if not history or key not in history[0]:
                continue
            values = [h[key] for h in history]
            ax.plot(epochs, values, marker=".", color=colour, label=key.replace("_", " "))
            if len(history) == 1:
                ax.annotate(
                    f"{values[0]:.2f}",
                    (epochs[0], values[0]),
                    xytext=(6, 0),
                    textcoords="offset points",
                    va="center",
                )
        ylabel = "ELBO (nats per point)" if title == "ELBO" else "nats per point"
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(history) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    axes[0, 0].legend()
    fig.tight_layout()
    return fig


def per_point_figure(reconstruction: Tensor, kl: Tensor) -> Figure:
    """Histograms over data points of the reconstruction term and the KL term."""
    fig, axes = _subplots(1, 2, figsize=(10, 3))
    for ax, values, name in ((axes[0], reconstruction, "E_q[log p(x|z)]"), (axes[1], kl, "KL")):
        ax.hist(values.numpy(), bins=40, color="tab:blue")
        ax.axvline(values.mean().item(), color="k", ls="--", label=f"mean {values.mean():.2f}")
        ax.set(xlabel=f"{name} (nats)", ylabel="points")
        ax.legend()
    fig.tight_layout()
    return fig


def image_panels_figure(
    panels: Sequence[tuple[str, Tensor]], image_shape: tuple[int, ...], ncol: int = 8
) -> Figure:
    """Image grids side by side, one titled panel per ``(title, images (N, C*H*W))``."""
    fig, axes = _subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, (title, images) in zip(axes[0], panels, strict=True):
        _show(ax, *_separated(images, image_shape), ncol)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    return fig


def traversal_figure(
    images: Tensor, image_shape: tuple[int, ...], row_labels: Sequence[str], values: Tensor
) -> Figure:
    """A grid of ``images (rows, steps, C*H*W)``: one latent dimension per row, varied along it."""
    rows, steps = images.shape[:2]
    flat, shape = _separated(images.reshape(rows * steps, -1), image_shape)
    height, width = shape[-2:]
    fig, ax = _subplots(figsize=(0.6 * steps + 1.5, 0.6 * rows + 0.8))
    _show(ax, flat, shape, steps)
    ax.set_yticks([height * (r + 0.5) for r in range(rows)], list(row_labels))
    ax.set_xticks([width * (s + 0.5) for s in range(steps)], [f"{v:+.1f}" for v in values])
    ax.set_xlabel("value of the dimension, in prior standard deviations from the prior mean")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.tight_layout()
    return fig


def latent_scatter_figure(
    points: Tensor,
    labels: Tensor | None,
    axis_labels: tuple[str, str],
    grid: np.ndarray | None = None,
    extent: tuple[float, float, float, float] | None = None,
) -> Figure:
    """Points ``(N, 2)`` coloured by label; with ``grid``, a decoded image grid beside them.

    ``grid`` is an image tiling decoded latents over ``extent`` (left, right, bottom, top),
    drawn on the same axes limits as the scatter so positions correspond.
    """
    fig, axes = _subplots(
        1,
        2 if grid is not None else 1,
        figsize=(14.5 if grid is not None else 6.5, 6.6 if grid is not None else 5.4),
        squeeze=False,
    )
    ax = axes[0, 0]
    if labels is not None:
        cmap = "tab10" if int(labels.max()) < 10 else "viridis"
        art = ax.scatter(*points.numpy().T, c=labels.numpy(), cmap=cmap, s=10, alpha=0.8)
        fig.colorbar(art, ax=ax, label="label")
    else:
        ax.scatter(*points.numpy().T, s=10, alpha=0.8)
    ax.set(xlabel=axis_labels[0], ylabel=axis_labels[1])
    if grid is not None and extent is not None:
        ax.set(xlim=extent[:2], ylim=extent[2:])
        axes[0, 1].imshow(
            _white_borders(grid), cmap=_grey(), vmin=0, vmax=1, extent=extent, aspect="auto"
        )
        axes[0, 1].set_box_aspect(1)
        ax.set_box_aspect(1)
        axes[0, 1].set(xlabel=axis_labels[0], ylabel=axis_labels[1], title="decoded grid")
    fig.tight_layout()
    return fig


TICK_SIZE = 10
"""Tick labels of the small multiples, in points: legible once the page scales a four-column
figure down to its width."""
TITLE_SIZE = 11


def latent_histograms_figure(
    samples: Tensor,
    dims: Sequence[int],
    titles: Sequence[str],
    prior_grid: Tensor | None = None,
    prior_density: Tensor | None = None,
    prior_samples: Tensor | None = None,
) -> Figure:
    """Histograms of samples ``(M, D)`` for ``dims``, over the prior's marginal density.

    Pass ``prior_grid (G,)`` with ``prior_density (G, D)`` where the prior's marginals have
    a density, else ``prior_samples (P, D)``, drawn as an outlined histogram.
    """
    from matplotlib.ticker import MaxNLocator  # deferred, as every matplotlib import here

    ncol = min(4, len(dims))
    nrow = math.ceil(len(dims) / ncol)
    fig, axes = _subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False)
    for ax in axes.flat[len(dims) :]:
        ax.axis("off")
    for ax, d, title in zip(axes.flat, dims, titles, strict=False):
        values = samples[:, d].numpy()
        prior = prior_samples[:, d].numpy() if prior_samples is not None else values[:0]
        # Shared bin edges, so the two histograms compare bar for bar.
        bins = np.histogram_bin_edges(np.concatenate([values, prior]), bins=50)
        ax.hist(values, bins=bins, density=True, color="tab:blue", alpha=0.6, label="q(z)")
        if prior_density is not None and prior_grid is not None:
            ax.plot(prior_grid.numpy(), prior_density[:, d].numpy(), color="k", label="p(z)")
        elif prior_samples is not None:
            ax.hist(prior, bins=bins, density=True, histtype="step", color="k", label="p(z)")
        ax.set_title(title, fontsize=TITLE_SIZE)
        ax.tick_params(labelsize=TICK_SIZE)
        # Few ticks, so that labels of a legible size do not collide.
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(3))
    axes.flat[0].legend(fontsize=TICK_SIZE)
    fig.tight_layout()
    return fig


def units_figure(activity: Tensor, kl_per_dim: Tensor | None, threshold: float) -> Figure:
    """Per latent dimension: variance of the posterior mean (log scale) and mean KL."""
    dims = np.arange(len(activity))
    # At most about 20 labelled ticks: 50 dimensions' labels would run into each other.
    ticks = dims[:: max(1, math.ceil(len(dims) / 20))]
    fig, axes = _subplots(1, 2 if kl_per_dim is not None else 1, figsize=(11, 3), squeeze=False)
    ax = axes[0, 0]
    ax.bar(
        dims,
        activity.clamp(min=1e-8).numpy(),
        color=np.where(activity > threshold, "tab:blue", "tab:gray"),
    )
    ax.axhline(threshold, color="tab:red", ls="--", label=f"active above {threshold:g}")
    ax.set(yscale="log", xlabel="latent dimension", ylabel="Var_x E_q[z_d|x]", title="activity")
    ax.set_xticks(ticks)
    ax.legend(fontsize=8)
    if kl_per_dim is not None:
        axes[0, 1].bar(dims, kl_per_dim.mean(0).numpy(), color="tab:orange")
        axes[0, 1].set(xlabel="latent dimension", ylabel="nats", title="mean KL per dimension")
        axes[0, 1].set_xticks(ticks)
    fig.tight_layout()
    return fig


def khat_figure(khat: Tensor, threshold: float) -> Figure:
    """Histogram of per-point Pareto k̂ with the reliability threshold."""
    fig, ax = _subplots(figsize=(6, 3))
    known = khat[~torch.isnan(khat)].numpy()
    ax.hist(known, bins=40, color="tab:green")
    ax.axvline(threshold, color="tab:red", ls="--", label=f"k̂ = {threshold:g}")
    ax.set(xlabel="Pareto k̂ per data point", ylabel="points")
    ax.legend()
    fig.tight_layout()
    return fig


def separated_grid(images: Tensor, image_shape: tuple[int, ...], ncol: int) -> np.ndarray:
    """:func:`image_grid` with a one-pixel NaN border between images (drawn white)."""
    return image_grid(*_separated(images, image_shape), ncol)


def _separated(images: Tensor, image_shape: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    """Images padded right and below with NaN, so tiles stay apart in a grid; returns them
    flattened and their padded ``(C, H + 1, W + 1)``."""
    channels, height, width = image_layout(image_shape)
    tiles = images.detach().float().cpu().reshape(-1, channels, height, width)
    padded = torch.nn.functional.pad(tiles, (0, 1, 0, 1), value=math.nan)
    return padded.flatten(1), (channels, height + 1, width + 1)


def _show(ax: Axes, images: Tensor, image_shape: tuple[int, ...], ncol: int) -> None:
    ax.imshow(_white_borders(image_grid(images, image_shape, ncol)), cmap=_grey(), vmin=0, vmax=1)


def _white_borders(grid: np.ndarray) -> np.ndarray:
    """A grid as ``imshow`` draws it: NaN (the borders) white, drawn by the colour map for
    grey grids and set to 1 in RGB ones, which ``imshow`` takes as they are."""
    return grid if grid.ndim == 2 else np.nan_to_num(grid, nan=1.0)


def _grey() -> Colormap:
    """Grey levels, with NaN (the borders of :func:`separated_grid`) drawn white."""
    import matplotlib

    return matplotlib.colormaps["gray"].with_extremes(bad="white")


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222;
       padding: 0 1em; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
p.caption { color: #444; font-size: 0.95em; max-width: 60em; }
p.note { background: #fff6d5; padding: 0.4em 0.8em; border-left: 4px solid #e0b000; }
p.banner { background: #fde2e1; padding: 0.6em 0.8em; border-left: 6px solid #c62828; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
nav a { margin-right: 1em; white-space: nowrap; }
"""


def html_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A complete HTML page: a title, a navigation bar and one section per ``(title, html)``.

    Section bodies are inserted as they are; titles are escaped.
    """
    nav = " ".join(f'<a href="#s{i}">{_escape(t)}</a>' for i, (t, _) in enumerate(sections))
    body = "\n".join(
        f'<section id="s{i}"><h2>{_escape(t)}</h2>\n{inner}</section>'
        for i, (t, inner) in enumerate(sections)
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_escape(title)}'
        f"</title><style>{_STYLE}</style></head><body><h1>{_escape(title)}</h1>"
        f"<nav>{nav}</nav>\n{body}\n</body></html>\n"
    )


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table of strings, escaped."""
    head = "".join(f"<th>{_escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _escape(value: object) -> str:
    return html.escape(str(value))


def _subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """``plt.subplots`` through matplotlib's object API: a ``Figure`` on an Agg canvas, never
    registered with pyplot, so that neither the caller's backend nor its figures change."""
    fig = _figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _figure(**kwargs: Any) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig
