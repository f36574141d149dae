"""The run report: one self-contained HTML page of figures and diagnostics for a trained run.

``write_report(RUN)`` evaluates the run on a data split (diagnostics and importance-sampled
log p(x), :mod:`inference.reporting.diagnostics`) and writes ``RUN/report.html``: training curves,
reconstructions, samples from the prior beside samples from the aggregate posterior, latent
traversals, the latent space coloured by label, the aggregate posterior against the prior per
dimension, Pareto k̂ and the tables. Images are embedded as base64 PNGs, so the file can be
mailed or archived alone.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import pyro
import torch
from torch import Tensor

from pyrovae.inference.algorithms.psis import KHAT_THRESHOLD
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.callbacks import collapse_message
from pyrovae.inference.experiment.data import Splits
from pyrovae.inference.experiment.runs import Run, atomic_write, check_writable, load_run
from pyrovae.inference.experiment.workflow import load_run_data
from pyrovae.inference.reporting import plots
from pyrovae.inference.reporting.aggregate import AggregateKL, aggregate_kl
from pyrovae.inference.reporting.diagnostics import Diagnostics, diagnose, univariate_factors

__all__ = ["REPORT", "write_report"]

REPORT = "report.html"

_Section = tuple[str, str]  # (title, inner HTML)


def write_report(
    run: Run | str | Path,
    data_split: str = "test",
    *,
    limit: int | None = 500,
    num_samples: int = 500,
    num_latent_samples: int = 16,
    traversal_dims: int = 8,
    seed: int = 0,
    data: Splits | None = None,
    path: str | Path | None = None,
    progress: bool = False,
    aggregate: bool = False,
) -> Path:
    """Evaluates a run on a data split and writes its report as one HTML file.

    Args:
        run: a loaded :class:`~inference.experiment.runs.Run` or a run directory.
        data_split: ``"train"``, ``"validation"`` or ``"test"``.
        limit: the first ``limit`` points of the split are evaluated (None: all).
        num_samples: K, importance samples per point for log p(x) and k̂ (0 skips them).
        num_latent_samples: S, draws of z per point for the diagnostics.
        traversal_dims: how many of the most active dimensions to traverse.
        seed: seeds every random draw, so a report is reproducible.
        data: the run's data, if already loaded; else loaded from its spec.
        path: where to write; default ``RUN/report.html``.
        progress: show a progress bar over the importance-sampled points.
        aggregate: also bound the marginal KL(q(z) || p(z)) from below with
            :func:`~inference.reporting.aggregate.aggregate_kl`, its critic trained on the
            training split (the validation split for a report of the training split); minutes
            on MNIST.

    Returns:
        The path written.

    Raises:
        PyrovaeError: an unknown split, fewer than two points, data that do not match, or
            too few points for the critic.
    """
    run = run if isinstance(run, Run) else load_run(run)
    out = Path(path) if path is not None else run.path / REPORT
    check_writable(out, "report")
    if out.is_dir():
        raise PyrovaeError(f"cannot write the report to {out}: it is a directory")
    if data is None:
        data = load_run_data(run.spec)
    x, labels = data.split(data_split)
    if x.shape[1] != run.checkpoint.features:
        raise PyrovaeError(
            f"{run.path} was trained on {run.checkpoint.features} features but the data "
            f"have {x.shape[1]}"
        )
    x, labels = x[:limit], None if labels is None else labels[:limit]
    if len(x) < 2:
        raise PyrovaeError(f"the {data_split} split has {len(x)} points; a report needs two")
    pyro.set_rng_seed(seed)
    diag = diagnose(
        run.model,
        run.guide,
        x,
        num_samples=num_samples,
        num_latent_samples=num_latent_samples,
        progress=progress,
    )
    bracket = _aggregate(run, data, data_split, x, seed) if aggregate else None
    shape = tuple(run.image_shape)
    sections = [
        ("Summary", _summary(run, diag, data_split, bracket)),
        ("Training curves", _training(run, diag)),
        ("Latent units", _units(diag)),
    ]
    with torch.no_grad():
        if len(shape) == 2:
            sections += _image_sections(run, diag, x, shape, traversal_dims, seed)
        else:
            note = "The data are not 2-D images, so reconstructions, samples and traversals "
            sections.append(("Images", _note(note + "are not drawn.")))
        sections.append(("Latent space", _latent_space(run, diag, labels, shape)))
    sections.append(("Aggregate posterior against the prior", _histograms(run, diag)))
    sections.append(("Importance sampling: Pareto k̂", _khat(diag)))
    atomic_write(out, plots.html_page(f"pyrovae report: {run.path}", sections).encode())
    return out


def _aggregate(run: Run, data: Splits, split: str, x: Tensor, seed: int) -> AggregateKL:
    """The critic's bound on the report's points, trained on another split's posteriors."""
    pool_split = "validation" if split == "train" else "train"
    pool, _ = data.split(pool_split)
    if run.spec.model.labels == "latent":  # M2: q(z) of unlabelled points, as the report's
        pool = pool.clone()
        pool[:, -run.spec.model.classes :] = 0
    try:
        return aggregate_kl(run.model, run.guide, pool, x, upper=False, seed=seed)
    except ValueError as error:
        raise PyrovaeError(
            f"cannot bound the marginal KL: the critic trains on the {pool_split} split "
            f"({len(pool)} points): {error}"
        ) from None


def _summary(run: Run, diag: Diagnostics, split: str, bracket: AggregateKL | None) -> str:
    s = diag.summary()
    n, d = int(s["num_points"]), int(s["latent_dim"])
    rows = [("ELBO", f"{s['elbo']:.3f}")]
    if "log_px" in s:
        rows.append(
            (
                f"log p(x), K = {int(s['num_samples'])}",
                f"{s['log_px']:.3f} ± {s['log_px_se']:.3f} (Monte Carlo ± "
                f"{s['log_px_mc_error']:.4f})",
            )
        )
        rows.append(("log p(x) − ELBO (gap)", f"{s['log_px'] - s['elbo']:.3f}"))
    rows += [
        ("reconstruction E_q[log p(x|z)]", f"{s['reconstruction']:.3f}"),
        (f"KL(q(z|x) ‖ p(z)) ({diag.kl_method})", f"{s['kl']:.3f}"),
        (
            "mutual information I(x; z)",
            f"{s['mutual_information']:.3f} (at most log N = {math.log(n):.2f})",
        ),
        ("marginal KL(q(z) ‖ p(z))", f"{s['marginal_kl']:.3f}"),
    ]
    if bracket is not None:
        rows.append(
            (
                "marginal KL, lower bound (critic)",
                f"{bracket.lower:.3f} ± {bracket.lower_se:.3f} (site {bracket.site}, "
                f"{bracket.epochs} critic epochs)",
            )
        )
    rows.append(("active units", f"{int(s['active_units'])} of {d}"))
    if "khat_bad_fraction" in s:
        rows.append((f"share of points with k̂ > {KHAT_THRESHOLD}", f"{s['khat_bad_fraction']:.1%}"))
        rows.append(("mean effective sample size", f"{s['ess']:.1f}"))
    caption = (
        f"Averages over the first {n} points of the {split} split, in nats per point. "
        "log p(x) is the importance-sampling estimate; ± is its standard error over points "
        "(the spread of the data), the Monte Carlo error of the estimator is in brackets. "
        "The average KL splits into the information z carries about x (mutual "
        "information) and the mismatch between the aggregate posterior q(z) and the prior "
        "(marginal KL); with finite N the first is biased down and the second up: the "
        "marginal KL of N points is an upper bound in expectation."
    )
    if bracket is not None:
        caption += (
            " The critic's lower bound holds for the whole data distribution's q(z): a "
            "classifier of posterior against prior draws, trained on another split, gives the "
            "Donsker-Varadhan bound on these points (± its standard error); the truth lies "
            "between the two, up to their Monte Carlo error."
        )
    notes = "".join(_note(note) for note in diag.notes)
    run_info = (
        f"<p>Run <code>{_e(run.path)}</code>, epoch {run.epoch}.</p>"
        f"<details><summary>spec</summary><pre>{_e(run.spec.to_toml())}</pre></details>"
    )
    return run_info + plots.html_table(("quantity", "value"), rows) + _caption(caption) + notes


def _training(run: Run, diag: Diagnostics) -> str:
    history = run.history
    logged = history and any("reconstruction" in k or "kl" in k for k in history[0])
    body = _figure(plots.training_curves_figure(history)) if history else _note("No history.")
    body += _caption(
        "ELBO per epoch on the training data (averaged during the epoch) and on the "
        "validation data (after it); higher is better. Validation falling while training "
        "rises means overfitting. The other panels split the validation ELBO into its "
        "reconstruction term E_q[log p(x|z)] and KL(q(z|x) ‖ p(z)): a KL that falls to 0 "
        "is posterior collapse."
    )
    if not logged:
        body += _note("Reconstruction and KL were not logged per epoch in this run.")
    alarm = collapse_message(history) if history else None
    if alarm is not None:
        body += _note(f"Warning: {alarm}.")
    body += _figure(plots.per_point_figure(diag.reconstruction, diag.kl))
    body += _caption(
        "How the ELBO splits per point: reconstruction E_q[log p(x|z)] (higher is "
        "better) and KL(q(z|x) ‖ p(z)), the nats each point's code costs. A KL near 0 "
        "for every point means the posterior has collapsed onto the prior."
    )
    return body


def _units(diag: Diagnostics) -> str:
    body = _figure(plots.units_figure(diag.activity, diag.kl_per_dim, diag.activity_threshold))
    kl_panel = (
        " Right: the KL each dimension costs."
        if diag.kl_per_dim is not None
        else " The KL does not split by dimension for this guide and prior."
    )
    body += _caption(
        "Left: how much each dimension's posterior mean varies across data points; a "
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
    return (
        body
        + plots.html_table(header, rows)
        + _caption(
            "Moments of the aggregate posterior q(z) against the prior's: the generator is fed "
            "p(z) at sampling time but was trained on codes from q(z), so where they differ, "
            "prior samples land where the decoder has seen few codes."
        )
    )


def _image_sections(
    run: Run, diag: Diagnostics, x: Tensor, shape: tuple[int, ...], top: int, seed: int
) -> list[_Section]:
    model, n = run.model, min(32, len(x))
    # A conditional model's rows are [x, one_hot(y)]: images from x, decoding with y.
    x, context = (model.split(x)[0], model.context_of(x)) if hasattr(model, "split") else (x, None)

    def rows(index: Tensor | slice) -> Tensor | None:
        return None if context is None else context[index]

    recon = plots.image_panels_figure(
        [
            ("input x", x[:n]),
            ("reconstruction at E_q[z|x]", _decode(model, diag.posterior_mean[:n], rows(slice(n)))),
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
    aggregate = _decode(model, diag.samples[0, picks], rows(picks))
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
    traversal = plots.traversal_figure(_decode(model, z, rows(slice(1))), shape, labels, values)
    return [
        (
            "Reconstructions",
            _figure(recon)
            + _caption(
                "Left: evaluated data points (binarized when the run binarizes); right: "
                "the mean of p(x|z) decoded at each point's posterior mean, in the same "
                "positions. Blurry or wrong images mean the code loses information about x."
            ),
        ),
        (
            "Samples: prior against aggregate posterior",
            _figure(samples)
            + _caption(
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
            _figure(traversal)
            + _caption(
                "Each row starts from the posterior mean of the first data point and moves "
                "one latent dimension from −3 to +3 prior standard deviations, keeping the "
                "others fixed; rows are the most active dimensions (activity in "
                "brackets), inactive ones only when no dimension is active. A row that "
                "does not change is a dimension the decoder ignores."
            ),
        ),
    ]


GRID_STEPS = 10
"""Decoded images per side of the 2-D latent grid: few enough that each stays legible."""


def _latent_space(run: Run, diag: Diagnostics, labels: Tensor | None, shape: tuple) -> str:
    means, d = diag.posterior_mean, diag.posterior_mean.shape[1]
    if d == 1:
        return _note("The latent space is one-dimensional; see the histogram below.")
    grid = extent = None
    if d == 2:
        points, axes = means, ("z0", "z1")
        sd = diag.prior_variance.sqrt()
        lo = torch.minimum(diag.prior_mean - 3 * sd, means.min(0).values)
        hi = torch.maximum(diag.prior_mean + 3 * sd, means.max(0).values)
        extent = (lo[0].item(), hi[0].item(), lo[1].item(), hi[1].item())
        conditional = hasattr(run.model, "split")
        if len(shape) == 2 and not conditional:
            steps = GRID_STEPS
            u = torch.linspace(lo[0].item(), hi[0].item(), steps, dtype=torch.float64)
            v = torch.linspace(hi[1].item(), lo[1].item(), steps, dtype=torch.float64)
            z = torch.stack(torch.meshgrid(v, u, indexing="ij")[::-1], -1).reshape(-1, 2)
            grid = plots.separated_grid(_decode(run.model, z), shape, steps)
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
    return _figure(fig) + _caption(text)


def _histograms(run: Run, diag: Diagnostics) -> str:
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
    return _figure(fig) + _caption(
        f"For {shown}: a histogram of draws z ~ q(z|x) over all evaluated points, i.e. "
        "of the aggregate posterior's marginal, over the prior's marginal (black). "
        "Narrower, shifted or multi-modal histograms show where q(z) and p(z) disagree; "
        "an inactive dimension follows the prior closely."
    )


def _khat(diag: Diagnostics) -> str:
    if diag.marginal is None or torch.isnan(diag.marginal.khat).all():
        return _note("No Pareto k̂: importance sampling was skipped or used fewer than 25 samples.")
    return _figure(plots.khat_figure(diag.marginal.khat, KHAT_THRESHOLD)) + _caption(
        "The Pareto k̂ of each point's importance weights (Vehtari et al., 2024). Below 0.7 "
        "the log p(x) estimate is reliable; above it the weights are heavy-tailed (the "
        "guide misses part of the posterior) and the estimate is likely too low."
    )


def _decode(model: torch.nn.Module, z: Tensor, context: Tensor | None = None) -> Tensor:
    """The mean of p(x|z) for float64 diagnostics ``z``, in the model's own dtype; a
    conditional model's ``context`` rows (one-hot labels) go with them."""
    tensors = [*model.parameters(), *model.buffers()]
    dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
    if context is None:
        return model.decode(z.to(dtype)).mean
    return model.decode(z.to(dtype), context.to(dtype)).mean


def _figure(fig: object) -> str:
    return f'<img alt="figure" src="data:image/png;base64,{plots.figure_to_base64(fig)}">'


def _caption(text: str) -> str:
    return f'<p class="caption">{_e(text)}</p>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _e(value: object) -> str:
    return html.escape(str(value))
