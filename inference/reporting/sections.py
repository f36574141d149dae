"""The figure sections of the run report and the small HTML helpers they share: latent
units, images (reconstructions, samples, traversals), the latent space, the aggregate
posterior against the prior per dimension, and Pareto k̂."""

from __future__ import annotations

import html
from collections.abc import Callable

import pyro
import torch
from torch import Tensor

from pyrovae.inference.algorithms.psis import KHAT_THRESHOLD
from pyrovae.inference.experiment.runs import Run
from pyrovae.inference.reporting import plots
from pyrovae.inference.reporting.diagnostics import Diagnostics, univariate_factors
from pyrovae.inference.reporting.sites import SiteDiagnostics
from pyrovae.model.labelled import Labelled

__all__ = [
    "GRID_STEPS",
    "Section",
    "caption",
    "decode",
    "escape",
    "figure",
    "histograms",
    "image_sections",
    "khat_section",
    "latent_space",
    "note",
    "units_section",
]

Section = tuple[str, str]
"""A report section: (title, inner HTML)."""

FOLD_ROWS = 10
"""A per-dimension table longer than this is folded (``<details>``) in the report."""

GRID_STEPS = 10
"""Decoded images per side of the 2-D latent grid: few enough that each stays legible."""


def units_section(diag: Diagnostics) -> str:
    body = figure(plots.units_figure(diag.activity, diag.kl_per_dim, diag.activity_threshold))
    two_panels = diag.kl_per_dim is not None
    kl_panel = (
        " Right: the KL each dimension costs."
        if two_panels
        else " The KL does not split by dimension for this guide and prior."
    )
    body += caption(
        ("Left: h" if two_panels else "H")
        + "ow much each dimension's posterior mean varies across data points; a "
        f"dimension above {diag.activity_threshold:g} is active (Burda et al., 2016), below "
        "it the encoder ignores x in that dimension." + kl_panel
    )
    kl = diag.kl_per_dim.mean(0) if diag.kl_per_dim is not None else None
    rows = []
    for d in range(len(diag.activity)):
        rows.append(
            (
                f"z{d}" + (" (active)" if diag.active[d] else ""),
                f"{diag.activity[d]:.4f}",
                "–" if kl is None else f"{kl[d]:.3f}",
                f"{diag.aggregate_mean[d]:+.3f}",
                f"{diag.aggregate_variance[d]:.3f}",
                f"{diag.prior_mean[d]:+.3f}",
                f"{diag.prior_variance[d]:.3f}",
            )
        )
    header = ("dimension", "Var E[z|x]", "KL", "q(z) mean", "q(z) var", "p(z) mean", "p(z) var")
    table = plots.html_table(header, rows)
    if len(rows) > FOLD_ROWS:  # a long table folds, its summary says what it holds
        active = int(diag.active.sum())
        table = (
            f"<details><summary>{len(rows)} dimensions, {active} active: moments per "
            f"dimension</summary>{table}</details>"
        )
    return (
        body
        + table
        + caption(
            "Moments of the aggregate posterior q(z) against the prior's: the generator is fed "
            "p(z) at sampling time but was trained on codes from q(z), so where they differ, "
            "prior samples land where the decoder has seen few codes."
        )
    )


def image_sections(
    run: Run, diag: Diagnostics, x: Tensor | Labelled, shape: tuple[int, ...], top: int, seed: int
) -> list[Section]:
    model, n = run.model, min(32, len(x))
    # A labelled model's batch: images from x, decoded with each row's label.
    x, context = (x.x, model.context_of(x)) if isinstance(x, Labelled) else (x, None)

    def rows(index: Tensor | slice) -> Tensor | None:
        return None if context is None else context[index]

    def read(z: Tensor, other: Callable[[SiteDiagnostics], Tensor]) -> Tensor:
        return decoder_input(model, diag, z, other)

    means = read(diag.posterior_mean[:n], lambda site: site.posterior_mean[:n])
    recon = plots.image_panels_figure(
        [
            ("input x", x[:n]),
            ("reconstruction at E_q[z|x]", decode(model, means, rows(slice(n)))),
        ],
        shape,
    )
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(diag.samples.shape[1], generator=generator)[:64]
    pyro.set_rng_seed(seed)
    classes = getattr(model, "classes", 0)
    if classes:  # one row per class, eight draws each
        prior = (
            "z ~ p(z), one row per class y",
            model.sample(8 * classes, labels=torch.arange(classes).repeat_interleave(8)),
        )
    else:
        prior = ("z ~ p(z): the prior", model.sample(len(picks)))
    drawn = read(diag.samples[0, picks], lambda site: site.samples[0, picks])
    aggregate = decode(model, drawn, rows(picks))
    samples = plots.image_panels_figure(
        [prior, ("z ~ q(z): the aggregate posterior", aggregate)], shape
    )
    ranked = diag.activity.argsort(descending=True)
    active = ranked[diag.active[ranked]]
    dims = (active if len(active) else ranked)[:top]
    values = torch.linspace(-3, 3, 11, dtype=torch.float64)
    base = diag.posterior_mean[0]
    z = base.repeat(len(dims), len(values), 1)
    for row, d in enumerate(dims):
        z[row, :, d] = diag.prior_mean[d] + values * diag.prior_variance[d].sqrt()
    labels = [f"z{d} ({diag.activity[d]:.2g})" for d in dims]
    z = read(z, lambda site: site.posterior_mean[0])
    traversal = plots.traversal_figure(decode(model, z, rows(slice(1))), shape, labels, values)
    return [
        (
            "Reconstructions",
            figure(recon)
            + caption(
                "Left: evaluated data points (binarized when the run binarizes); right: "
                "the mean of p(x|z) decoded at each point's posterior mean, in the same "
                "positions. Blurry or wrong images mean the code loses information about x."
            ),
        ),
        (
            "Samples: prior against aggregate posterior",
            figure(samples)
            + caption(
                "Left: the usual generation, z drawn from the prior N(0, I) (or the learned "
                "prior). Right: z drawn from the aggregate posterior, i.e. a random data "
                "point encoded and one z drawn from q(z|x). Generating from the prior is "
                "only right when q(z) matches p(z) (small marginal KL); where the right "
                "panel looks better than the left, the prior puts mass in regions the "
                "decoder never saw in training (the holes of the aggregate posterior)."
                + (
                    f" This model is conditional: the left panel has one row per class y "
                    f"(0 to {classes - 1} from the top, eight draws each), and the right "
                    "decodes each z with its own point's label."
                    if classes
                    else ""
                )
            ),
        ),
        (
            "Latent traversals",
            figure(traversal)
            + caption(
                "Each row starts from the posterior mean of the first data point and moves "
                "one latent dimension from −3 to +3 prior standard deviations, keeping the "
                "others fixed; rows are the most active dimensions (activity in "
                "brackets), inactive ones only when no dimension is active. A row that "
                "does not change is a dimension the decoder ignores."
            ),
        ),
    ]


def latent_space(run: Run, diag: Diagnostics, labels: Tensor | None, shape: tuple) -> str:
    means, d = diag.posterior_mean, diag.posterior_mean.shape[1]
    if d == 1:
        return note("The latent space is one-dimensional; see the histogram below.")
    grid = extent = None
    if d == 2:
        points, axes = means, ("z0", "z1")
        sd = diag.prior_variance.sqrt()
        lo = torch.minimum(diag.prior_mean - 3 * sd, means.min(0).values)
        hi = torch.maximum(diag.prior_mean + 3 * sd, means.max(0).values)
        extent = (lo[0].item(), hi[0].item(), lo[1].item(), hi[1].item())
        conditional = hasattr(run.model, "classes")  # its decoder reads a label too
        reads_more = len(getattr(run.model, "decoder_sites", ())) > 1
        if plots.drawable(shape) and not conditional and not reads_more:
            steps = GRID_STEPS
            u = torch.linspace(lo[0].item(), hi[0].item(), steps, dtype=torch.float64)
            v = torch.linspace(hi[1].item(), lo[1].item(), steps, dtype=torch.float64)
            z = torch.stack(torch.meshgrid(v, u, indexing="ij")[::-1], -1).reshape(-1, 2)
            grid = plots.separated_grid(decode(run.model, z), shape, steps)
        text = (
            "Each point is a data point's posterior mean, coloured by its label. Right: "
            "the decoder's output over a grid of the same axes. Regions of the grid far from "
            "any point are gaps of the aggregate posterior: a prior sample there decodes to "
            "something the decoder was never trained to produce."
        )
        if conditional:
            text = (
                "Each point is a data point's posterior mean, coloured by its label. No "
                "decoded grid: a conditional decoder needs a class as well as z (see the "
                "samples by class above)."
            )
    else:
        _, s, v = torch.pca_lowrank(means, q=2, center=True)
        points = (means - means.mean(0)) @ v[:, :2]
        share = (s[:2] ** 2 / (means - means.mean(0)).square().sum()).tolist()
        axes = (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)")
        text = (
            f"The {d}-dimensional posterior means projected on their first two principal "
            "components, coloured by label. Separated clusters mean the code captures the "
            "class; a structureless blob near 0 suggests a collapsed posterior."
        )
    fig = plots.latent_scatter_figure(points, labels, axes, grid, extent)
    return figure(fig) + caption(text)


def histograms(run: Run, diag: Diagnostics) -> str:
    order = diag.activity.argsort(descending=True)[:16].sort().values.tolist()
    samples = diag.samples.reshape(-1, diag.samples.shape[-1])
    titles = [f"z{d}" + (" (active)" if diag.active[d] else "") for d in order]
    with torch.no_grad():
        # The prior's own factors are the site's marginal only where the prior draws it: in a
        # stack the panels show z1, whose marginal is known through draws of the model.
        top = getattr(run.model, "latent_sites", (diag.primary,))[-1]
        reads = getattr(run.model.prior, "reads_labels", False)  # p(z | y): no one marginal
        base = univariate_factors(run.model.prior()) if top == diag.primary and not reads else None
        lo, hi = samples.min().item(), samples.max().item()
        if base is not None:
            grid = torch.linspace(min(lo, -4), max(hi, 4), 200, dtype=torch.float64)
            density = base.log_prob(grid.to(base.mean.dtype)[:, None]).exp()
            kwargs = {
                "prior_grid": grid,
                "prior_density": density.double().expand(-1, len(diag.activity)),
            }
        else:
            kwargs = {"prior_samples": diag.prior_samples}
    fig = plots.latent_histograms_figure(samples, order, titles, **kwargs)
    shown = (
        f"the {len(order)} most active of {len(diag.activity)} dimensions"
        if len(order) < len(diag.activity)
        else "every dimension"
    )
    return figure(fig) + caption(
        f"For {shown}: a histogram of draws z ~ q(z|x) over all evaluated points, i.e. "
        "of the aggregate posterior's marginal, over the prior's marginal (black). "
        "Narrower, shifted or multi-modal histograms show where q(z) and p(z) disagree; "
        "an inactive dimension follows the prior closely."
    )


def khat_section(diag: Diagnostics) -> str:
    if diag.marginal is None or torch.isnan(diag.marginal.khat).all():
        return note("No Pareto k̂: importance sampling was skipped or used fewer than 25 samples.")
    return figure(plots.khat_figure(diag.marginal.khat, KHAT_THRESHOLD)) + caption(
        "The Pareto k̂ of each point's importance weights (Vehtari et al., 2024). Below 0.7 "
        "the log p(x) estimate is reliable; above it the weights are heavy-tailed (the "
        "guide misses part of the posterior) and the estimate is likely too low."
    )


def decoder_input(
    model: torch.nn.Module,
    diag: Diagnostics,
    z: Tensor,
    other: Callable[[SiteDiagnostics], Tensor],
) -> Tensor:
    """What the decoder reads for values ``z`` of the primary site: ``z`` itself, or for a
    model whose decoder reads several latents (``decoder_sites``, a skip stack) ``z`` beside
    ``other(site)`` of each other site, in the decoder's order."""
    names = getattr(model, "decoder_sites", (diag.primary,))
    if tuple(names) == (diag.primary,):
        return z
    parts = [z if name == diag.primary else other(diag.sites[name]) for name in names]
    parts = [part.to(z) for part in parts]
    shape = torch.broadcast_shapes(*(part.shape[:-1] for part in parts))
    return torch.cat([part.expand(*shape, -1) for part in parts], -1)


def decode(model: torch.nn.Module, z: Tensor, context: Tensor | None = None) -> Tensor:
    """The mean of p(x|z) for float64 diagnostics ``z``, in the model's own dtype; a
    conditional model's ``context`` rows (one-hot labels) go with them."""
    tensors = [*model.parameters(), *model.buffers()]
    dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
    if context is None:
        return model.decode(z.to(dtype)).mean
    return model.decode(z.to(dtype), context.to(dtype)).mean


def figure(fig: object) -> str:
    return f'<img alt="figure" src="data:image/png;base64,{plots.figure_to_base64(fig)}">'


def caption(text: str) -> str:
    return f'<p class="caption">{escape(text)}</p>'


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def escape(value: object) -> str:
    return html.escape(str(value))
