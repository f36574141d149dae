"""Diagnostics of a model/guide pair: where the KL goes, which units are used, how q(z) fits p(z).

For any Pyro model and guide whose sample sites sit in the data plate (a VAE, a stack of
latent layers, a hand-written pair), :func:`diagnose` scores N data points with S draws from
the guide through the one scoring path (:func:`pyrovae.inference.algorithms.scoring.score`)
and computes, per latent site:

- KL(q(z|x) || p(z)) per point, analytic where torch has it (per dimension when q and p both
  factorize into univariate distributions), else a Monte Carlo mean over the draws; for a
  site whose prior or guide depends on other latents, the KL given the drawn parents;
- active units: dimension d is active when Var_x(E_q[z_d|x]) exceeds 0.01 (Burda et al.);
- the aggregate posterior q(z) = (1/N) sum_n q(z|x_n): its moments against the prior's, and,
  for a site whose guide depends on x alone and whose prior on no other latent, the split of
  the average KL into mutual information and marginal KL (Hoffman and Johnson):
  ``mean_n KL(q(z|x_n) || p(z)) = I(x; z) + KL(q(z) || p(z))``;

and, over all sites, the reconstruction term E_q[log p(x|z)] per point and optionally the
importance-sampling estimate of log p(x) with its Pareto k̂.

The aggregate terms are exact for the N-point mixture, up to the Monte Carlo error of the
outer expectation: with z drawn from q(z|x_n), ``log q(z) = logsumexp_j log q(z|x_j) - log N``
is the mixture's own log density, computed in chunks of z so memory stays bounded. As
estimates of the same quantities for the data distribution they are biased for finite N: the
mixture of N components is lumpier than the population's aggregate posterior, so the mutual
information is biased down (it is the InfoNCE bound, at most log N) and the marginal KL up by
the same amount, since their sum, the average KL, is unbiased. The bias shrinks as N grows;
with N = 500 points, an MI near log 500 ≈ 6.2 nats means the bound is saturated, and the
marginal KL is then the mean KL minus about log N. :func:`~pyrovae.inference.aggregate_kl`
bounds the population's marginal KL from below without that ceiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

import pyro
import torch
from pyro import poutine
from torch import Tensor

from pyrovae.inference.algorithms.marginal import (
    MarginalLikelihood,
    like_parameters,
    log_marginal_likelihood,
)
from pyrovae.inference.algorithms.psis import khat_bad_fraction
from pyrovae.inference.algorithms.scoring import (
    MAX_PLATE_NESTING,
    PARTICLE_PLATE,
    Scores,
    check_sites,
    score,
)
from pyrovae.inference.errors import check_int
from pyrovae.inference.experiment.validation import ACTIVITY_THRESHOLD
from pyrovae.inference.reporting.sites import (
    SiteDiagnostics,
    flat_site,
    site_diagnostics,
    to_cpu,
    univariate_factors,
)
from pyrovae.model.sites import LATENT

__all__ = [
    "ACTIVITY_THRESHOLD",
    "Diagnostics",
    "SiteDiagnostics",
    "diagnose",
    "ancestral_draws",
    "khat_bad_fraction",
    "primary_site",
    "univariate_factors",
]

_PRIOR_MOMENT_SAMPLES = 10_000
_DEFAULT_MAX_MEMORY = 64 * 2**20

Program = Callable[..., Any]


_T = TypeVar("_T")


class _PrimaryView(Generic[_T]):
    """A read-only attribute of :class:`Diagnostics` that is its primary site's attribute of
    the same name: visible to IDEs and type checkers, unlike a ``__getattr__``."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, owner_object: None, owner: type) -> _PrimaryView[_T]: ...

    @overload
    def __get__(self, owner_object: Diagnostics, owner: type) -> _T: ...

    def __get__(self, owner_object: Diagnostics | None, owner: type) -> Any:
        if owner_object is None:
            return self
        return getattr(owner_object.site, self.name)


@dataclass(frozen=True)
class Diagnostics:
    """Per-point and per-site diagnostics of a model and guide on N points.

    The single-site views (``kl_per_dim``, ``posterior_mean``, ``activity``, ...) are those
    of :attr:`primary`, the site the VAE panels of a report draw: the one the decoder reads
    (the first of a model's ``latent_sites``, ``"z"`` or the bottom ``"z1"`` of a stack), else
    the model's first latent site.

    Attributes:
        reconstruction: ``(N,)`` E_q[log p(x|z)], a Monte Carlo mean over the draws.
        sites: latent site name -> :class:`SiteDiagnostics`, in the model's order.
        primary: the site of the single-site views.
        marginal: the importance-sampling result for the same points, or None.
        notes: plain-language remarks on how the figures were computed.

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016);
        ELBO surgery: yet another way to carve up the variational evidence lower bound
        (Hoffman and Johnson, 2016)
    """

    reconstruction: Tensor
    sites: dict[str, SiteDiagnostics]
    primary: str
    marginal: MarginalLikelihood | None = None
    notes: tuple[str, ...] = ()

    @property
    def kl(self) -> Tensor:
        """``(N,)`` the KL over all latent sites per point."""
        return sum(site.kl for site in self.sites.values())

    @property
    def elbo(self) -> Tensor:
        """``(N,)`` the ELBO per point, reconstruction minus KL."""
        return self.reconstruction - self.kl

    @property
    def site(self) -> SiteDiagnostics:
        """The :class:`SiteDiagnostics` of :attr:`primary`, whose figures the views below are."""
        return self.sites[self.primary]

    # The primary site's figures, as attributes of the whole (see SiteDiagnostics).
    kl_per_dim = _PrimaryView["Tensor | None"]("kl_per_dim")
    kl_method = _PrimaryView[str]("kl_method")
    posterior_mean = _PrimaryView[Tensor]("posterior_mean")
    posterior_variance = _PrimaryView[Tensor]("posterior_variance")
    samples = _PrimaryView[Tensor]("samples")
    prior_mean = _PrimaryView[Tensor]("prior_mean")
    prior_variance = _PrimaryView[Tensor]("prior_variance")
    prior_samples = _PrimaryView[Tensor]("prior_samples")
    pointwise_information = _PrimaryView["Tensor | None"]("pointwise_information")
    mutual_information = _PrimaryView[float]("mutual_information")
    marginal_kl = _PrimaryView[float]("marginal_kl")
    activity_threshold = _PrimaryView[float]("activity_threshold")
    posterior_mean_error = _PrimaryView["Tensor | None"]("posterior_mean_error")
    latent_dim = _PrimaryView[int]("latent_dim")
    activity = _PrimaryView[Tensor]("activity")
    active = _PrimaryView[Tensor]("active")
    aggregate_mean = _PrimaryView[Tensor]("aggregate_mean")
    aggregate_variance = _PrimaryView[Tensor]("aggregate_variance")

    def summary(self) -> dict[str, float]:
        """Dataset-level figures as plain floats, for tables and JSON.

        ``mutual_information`` and ``marginal_kl`` are those of the primary site; with more
        than one latent site, ``kl[NAME]`` and ``active_units[NAME]`` give each site's share.
        ``log_px_se`` is the standard error of the mean log p(x) over the points (their
        spread), ``log_px_mc_error`` the importance sampler's Monte Carlo error of it.
        """
        n = len(self.reconstruction)
        primary = self.sites[self.primary]
        out = {
            "num_points": float(n),
            "latent_dim": float(sum(s.latent_dim for s in self.sites.values())),
            "elbo": self.elbo.mean().item(),
            "reconstruction": self.reconstruction.mean().item(),
            "kl": self.kl.mean().item(),
            "mutual_information": primary.mutual_information,
            "mutual_information_bound": math.log(n),
            "marginal_kl": primary.marginal_kl,
            "active_units": float(sum(s.active.sum().item() for s in self.sites.values())),
        }
        if len(self.sites) > 1:
            for name, site in self.sites.items():
                out[f"kl[{name}]"] = site.kl.mean().item()
                out[f"active_units[{name}]"] = float(site.active.sum().item())
        if self.marginal is not None:
            ml = self.marginal.summary()
            out["log_px"] = ml["log_px"]
            out["log_px_se"] = ml["log_px_se"]
            out["log_px_mc_error"] = ml["log_px_mc_error"]
            out["ess"] = ml["ess"]
            out["khat_max"] = ml["khat_max"]
            out["khat_bad_fraction"] = ml["khat_bad_fraction"]
            out["num_samples"] = float(self.marginal.num_samples)
        return out


def diagnose(
    model: Program,
    guide: Program,
    x: Tensor,
    *,
    num_samples: int = 500,
    num_latent_samples: int = 16,
    marginal: MarginalLikelihood | None = None,
    activity_threshold: float = ACTIVITY_THRESHOLD,
    aggregate: bool = True,
    batch_size: int = 256,
    max_memory: int = _DEFAULT_MAX_MEMORY,
    progress: bool = False,
) -> Diagnostics:
    """Diagnoses a model and guide on the data points ``x``.

    Args:
        model: a Pyro model ``model(x)``, every sample site in the data plate.
        guide: a Pyro guide ``guide(x)`` with a site for each latent site of the model.
        x: ``(N, *features)`` data points; N > 1.
        num_samples: K, importance samples per point for log p(x) and k̂; 0 skips it.
        num_latent_samples: S, draws per point for the reconstruction term, the Monte Carlo
            KL, the aggregate posterior and non-Gaussian moments.
        marginal: an importance-sampling result for the same ``x`` to reuse, instead of
            running the estimator.
        activity_threshold: the variance of the posterior mean above which a unit is active.
        aggregate: compute the mutual information and the marginal KL, which score all
            N S draws under each of the N posteriors: the costly part for a flow guide,
            whose density of other points' draws is its sequential direction. Without it
            they are NaN, and many draws for the posterior means (unit activity) stay cheap.
        batch_size: points scored at a time (times S draws).
        max_memory: approximate budget in bytes of the ``(z, point)`` log-density matrix
            of one chunk of the aggregate posterior.
        progress: show a progress bar over the importance-sampled points.

    Returns:
        The :class:`Diagnostics`.

    Raises:
        ValueError: fewer than two points, a non-positive S or batch size, or a pair whose
            sites cannot be scored per point.

    References:
        ELBO surgery: yet another way to carve up the variational evidence lower bound
        (Hoffman and Johnson, 2016)

    Example:
        >>> import torch
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> from pyrovae.model import VAE, Gaussian, StandardNormal
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> guide = AmortizedGuide(DiagonalNormal(5, 2))
        >>> d = diagnose(vae, guide, torch.randn(20, 5), num_samples=50)
        >>> list(d.sites), d.summary()["latent_dim"]
        (['z'], 2.0)
        >>> d.summary()["mutual_information"] <= d.summary()["mutual_information_bound"]  # log N
        True
    """
    if x.dim() < 2 or len(x) < 2:
        raise ValueError(f"x must be (N, *features) with N >= 2, got shape {tuple(x.shape)}")
    x = like_parameters(x, model, guide)
    for name, value in (("num_latent_samples", num_latent_samples), ("batch_size", batch_size)):
        check_int(value, name)
    if marginal is None and num_samples > 0:
        marginal = log_marginal_likelihood(
            model, guide, x, num_samples=num_samples, progress=progress
        )
    if marginal is not None and len(marginal.log_px) != len(x):
        raise ValueError(f"marginal has {len(marginal.log_px)} points but x has {len(x)}")

    notes: list[str] = []
    with torch.no_grad(), pyro.validation_enabled(False):
        blocks = [
            _score_block(model, guide, block, num_latent_samples) for block in x.split(batch_size)
        ]
        check_sites(blocks[0][0])
        names = blocks[0][0].latent_sites
        own_guide, root_prior = _independent_sites(model, guide, x[:2], names)
        guide_fns = _trace(guide, x)
        prior_draws = ancestral_draws(model, x, names, _PRIOR_MOMENT_SAMPLES)
        reconstruction = torch.cat([to_cpu(scores.log_likelihood.mean(0)) for scores, _ in blocks])
        sites = {}
        for name in names:
            components = None
            if aggregate and name in own_guide and name in root_prior:
                components = guide_fns.nodes[name]["fn"]
            sites[name] = site_diagnostics(
                name, blocks, components, prior_draws[name], max_memory, activity_threshold, notes
            )
        missing = [n for n in names if n not in own_guide or n not in root_prior]
        if missing and aggregate:
            notes.append(
                f"mutual information and marginal KL are not computed for {', '.join(missing)}: "
                "the aggregate posterior of a site whose guide or prior depends on other "
                "latents has no closed form here."
            )
    return Diagnostics(reconstruction, sites, primary_site(model, names), marginal, tuple(notes))


def primary_site(model: Program, names: list[str]) -> str:
    """The site the decoder reads: the first of a model's ``latent_sites`` (``"z"``, or the
    bottom ``"z1"`` of a stack), else ``"z"``, else the first of ``names``."""
    own = getattr(model, "latent_sites", (LATENT,))
    return own[0] if own and own[0] in names else LATENT if LATENT in names else names[0]


def _score_block(
    model: Program, guide: Program, x: Tensor, num_particles: int
) -> tuple[Scores, dict[str, Any]]:
    scores = score(model, guide, x, num_particles=num_particles, scaled=False)
    sites = {
        name: (scores.guide_trace.nodes[name], scores.model_trace.nodes[name])
        for name in scores.latent_sites
    }
    return scores, sites


def _trace(program: Program, x: Tensor) -> Any:
    return poutine.trace(program).get_trace(x)


def _independent_sites(
    model: Program, guide: Program, x: Tensor, names: list[str]
) -> tuple[set[str], set[str]]:
    """The sites whose guide distribution depends on x alone, and those whose prior depends
    on no other latent: two independent runs give them the same density at a fixed value."""

    def same(first: Any, second: Any) -> bool:
        value = first["value"]
        return torch.allclose(first["fn"].log_prob(value), second["fn"].log_prob(value))

    guides = [_trace(guide, x) for _ in range(2)]
    models = [_trace(poutine.replay(model, trace=g), x) for g in guides]
    own_guide = {n for n in names if same(guides[0].nodes[n], guides[1].nodes[n])}
    root_prior = {n for n in names if same(models[0].nodes[n], models[1].nodes[n])}
    return own_guide, root_prior


def ancestral_draws(
    model: Program, x: Tensor, names: list[str], num_draws: int, chunk: int = 16_384
) -> dict[str, Tensor]:
    """``num_draws`` ancestral draws ``(num_draws, D)`` of each latent site: the model run
    with its data unobserved under a particle plate, at most about ``chunk`` draws a run."""
    per_run = max(1, chunk // len(x))
    draws: dict[str, list[Tensor]] = {name: [] for name in names}
    for start in range(0, math.ceil(num_draws / len(x)), per_run):
        num_particles = min(per_run, math.ceil(num_draws / len(x)) - start)
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=-(MAX_PLATE_NESTING + 1)):
            trace = _trace(poutine.uncondition(model), x)
        for name in names:
            draws[name].append(flat_site(trace.nodes[name]["value"]).flatten(0, 1))
    return {name: torch.cat(parts)[:num_draws] for name, parts in draws.items()}
